from viz_app.cli import main

raise SystemExit(main())
