"""``lightning-attr``: one command with subcommands (also ``python -m lightning_attr``).

    lightning-attr train [hydra overrides]       same as lightning-attr-train
    lightning-attr attribute run_dir=... [...]   same as lightning-attr-attribute
    lightning-attr demo [RUN_DIR]                train experiment=demo, then attribute (default runs/demo;
                                                 an earlier demo there is replaced)
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n", 1)[1].rstrip()


def _run_hydra(main, prog: str, args: list[str]) -> None:
    saved = sys.argv
    sys.argv = [prog, *args]  # Hydra parses sys.argv
    try:
        main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage:\n" + USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from lightning_attr.app.train import main as train_main

        _run_hydra(train_main, "lightning-attr train", rest)
    elif command == "attribute":
        from lightning_attr.app.attribute import main as attribute_main

        _run_hydra(attribute_main, "lightning-attr attribute", rest)
    elif command == "demo":
        if len(rest) > 1 or (rest and "=" in rest[0]):
            print(f"lightning-attr demo takes at most one argument, the run directory; got {rest}.", file=sys.stderr)
            return 2
        run_dir = rest[0] if rest else "runs/demo"
        from lightning_attr.app.attribute import main as attribute_main
        from lightning_attr.app.train import main as train_main

        _run_hydra(train_main, "lightning-attr train",
                   ["experiment=demo", f"hydra.run.dir={run_dir}", "callbacks.attribution.overwrite=true"])
        _run_hydra(attribute_main, "lightning-attr attribute", [f"run_dir={run_dir}"])
    else:
        print(f"unknown command {command!r}; expected train, attribute or demo.\nusage:\n{USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
