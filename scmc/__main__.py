from scmc.cli import run

run()
