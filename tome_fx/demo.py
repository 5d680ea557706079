"""``python -m tome_fx.demo``: the README's first command; the demo is ``tome_fx.tools.demo``."""

from .tools.demo import main

if __name__ == "__main__":
    main()
