"""``python -m manu_fast.demo``: the same as ``manu-fast demo``."""
from .cli import main, parser

if __name__ == "__main__":
    main(parser().parse_args())
