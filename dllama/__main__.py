from dllama.commands import main

raise SystemExit(main())
