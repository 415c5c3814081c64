from scmc.cli import main

main()
