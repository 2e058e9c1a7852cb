from anodfd.cli import main

raise SystemExit(main())
