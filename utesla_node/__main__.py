from .cli.node import main

main()
