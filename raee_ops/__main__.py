from raee_ops.cli import main

main()
