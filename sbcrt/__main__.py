from sbcrt.cli import main

raise SystemExit(main())
