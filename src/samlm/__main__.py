from samlm.cli import main

raise SystemExit(main())
