from fabricatord.cli import main

raise SystemExit(main())
