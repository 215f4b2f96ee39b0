"""``python -m packager``: the same CLI as the ``edgepack`` console script."""

from packager.cli import main

main()
