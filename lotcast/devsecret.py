"""The one-machine JWT secret: kept in the `up` data dir so tokens outlive a restart.

`lotcast up` creates ``<data dir>/jwt-secret`` once (mode 0600) and reuses it on every later
start; `lotcast token` reads the same file when it is given no secret. An explicit secret
(``--jwt-secret`` or ``LOTCAST_JWT_SECRET``) always wins over the file.
"""

from __future__ import annotations

import enum
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "LOTCAST_DATA_DIR"
DEFAULT_DATA_DIR = ".lotcast"
SECRET_ENV = "LOTCAST_JWT_SECRET"
SECRET_FILE = "jwt-secret"


class SecretSource(enum.Enum):
    EXPLICIT = "explicit"  # --jwt-secret or LOTCAST_JWT_SECRET
    FILE = "file"
    CREATED = "created"  # the file did not exist; it does now


@dataclass(frozen=True)
class DevSecret:
    value: str
    source: SecretSource
    path: Path | None  # the secret file, when the secret came from (or went to) one


def data_dir(arg: str | None = None) -> Path:
    """`--data-dir`, else LOTCAST_DATA_DIR, else ./.lotcast (the same rule for `up` and `token`)."""
    return Path(arg or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).resolve()


def secret_path(directory: Path) -> Path:
    return directory / SECRET_FILE


def read_secret(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if not value:
        raise ValueError(f"{path} is empty: delete it and `lotcast up` makes a new one")
    return value


def load_or_create(directory: Path) -> DevSecret:
    """The secret in `directory`, created (0600, never overwritten) if there is none yet."""
    path = secret_path(directory)
    existing = read_secret(path)
    if existing is not None:
        return DevSecret(existing, SecretSource.FILE, path)
    directory.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    try:
        # O_EXCL: two `up`s starting at once agree on one secret (the loser reads the winner's).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        again = read_secret(path)
        if again is None:
            raise
        return DevSecret(again, SecretSource.FILE, path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)  # the umask may have narrowed it; never widened
    return DevSecret(value, SecretSource.CREATED, path)


def explicit_secret(flag: str | None = None) -> str | None:
    return flag or os.environ.get(SECRET_ENV) or None
