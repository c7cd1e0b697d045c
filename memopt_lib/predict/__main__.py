import sys

if sys.argv[1:2] == ["goals"]:  # python -m memopt_lib.predict goals --gpu h200 --json ...
    from .goals import main
    sys.exit(main(sys.argv[2:]))

from .ladder import main

sys.exit(main())
