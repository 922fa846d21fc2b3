from benchmarks.accuracy.run import main

raise SystemExit(main())
