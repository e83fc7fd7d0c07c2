import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI itself loads (cli.main catches it after)
    print("snapfs: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
