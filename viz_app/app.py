"""`vit-lens app`: start the Streamlit page on 127.0.0.1 (what `make run` does).

The page is the same one `streamlit run streamlit_app.py` serves from a checkout; this launcher
also works from an installed package. Server options come from the repository's
`.streamlit/config.toml` when it is there (a checkout or an editable install) and otherwise from
SAFE_DEFAULTS, the options the page must never run without. Arguments after `app` are passed to
`streamlit run` and win over both (e.g. `vit-lens app --server.port 8600`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

PAGE_SCRIPT = Path(__file__).with_name("app_page.py")
REPO_CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"
SAFE_DEFAULTS = {
    "server.address": "127.0.0.1",  # never listen beyond this machine unless asked
    "server.headless": True,
    "server.fileWatcherType": "none",  # never watch a virtual environment
    "browser.gatherUsageStats": False,
    "client.showErrorDetails": "none",  # never a traceback on the page
}


def server_options(config: Path = REPO_CONFIG) -> dict[str, object]:
    """Flat `section.key -> value` options: SAFE_DEFAULTS, overridden by the config file if any."""
    options: dict[str, object] = dict(SAFE_DEFAULTS)
    if config.is_file():
        with config.open("rb") as f:
            for section, values in tomllib.load(f).items():
                options.update({f"{section}.{k}": v for k, v in values.items()})
    return options


def command(argv: list[str]) -> list[str]:
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in server_options().items()]
    return [sys.executable, "-m", "streamlit", "run", str(PAGE_SCRIPT), *flags, *argv]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd = command(argv)
    if os.name == "posix":
        # become the server (same pid): a signal meant for `vit-lens app` (a service manager's or a
        # test's SIGTERM) reaches Streamlit itself; a child would be left running without its parent
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
