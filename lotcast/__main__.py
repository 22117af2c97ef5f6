from lotcast.cli import main

main()
