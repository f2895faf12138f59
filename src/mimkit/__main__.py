from mimkit.cli import main

raise SystemExit(main())
