from megasae.cli import main

main()
