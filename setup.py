"""Build config beyond pyproject.toml: the optional native fan-out extensions.

`optional=True`: a machine without a C compiler or the Python headers still installs lotcast;
the media forwarder falls back to its pure-Python path (lotcast/media/native.py) and the room
sockets to their transport writes (lotcast/interactive/wswrite.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lotcast.media._fanout",
            sources=["lotcast/media/_fanout.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra",
                                "-Wno-missing-field-initializers"],
            optional=True,
        ),
        Extension(
            "lotcast.interactive._wswrite",
            sources=["lotcast/interactive/_wswrite.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra"],
            optional=True,
        ),
    ],
)
