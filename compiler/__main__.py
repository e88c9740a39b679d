from tcc.cli import main

raise SystemExit(main())
