from biomedgpt.train.cli import main

raise SystemExit(main())
