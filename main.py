"""Entry point: ``python main.py {fit,validate,test,predict} --config configs/<model>.yaml``."""

from fqvit_pl.cli import cli_main

if __name__ == "__main__":
    cli_main()
