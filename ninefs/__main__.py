from ninefs.cli import main

main()
