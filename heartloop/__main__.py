from heartloop.service.cli import main

raise SystemExit(main())
