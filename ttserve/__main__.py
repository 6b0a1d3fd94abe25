from ttserve.cli import main

main()
