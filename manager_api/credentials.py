"""The local credentials `hydro up` writes and the CLI reads: the manager's URL and an admin token.

``{data_dir}/credentials.json`` holds the token itself (mode 0600) for the CLI; ``{data_dir}/tokens.json`` holds
only its hash, for the manager. The token is kept across restarts so scripts keep working.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from manager_api.auth import new_token, write_token_file

CREDENTIALS_FILE = "credentials.json"
TOKENS_FILE = "tokens.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str
    token: str


def load_credentials(data_dir: Path) -> Credentials | None:
    """The credentials `hydro up` left in ``data_dir``, if any (a damaged file counts as none)."""
    try:
        raw = json.loads((data_dir / CREDENTIALS_FILE).read_text())
        return Credentials(api_url=str(raw["api_url"]), token=str(raw["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_admin_credentials(data_dir: Path, api_url: str) -> tuple[Credentials, Path]:
    """Reuse or create the admin token; write both files; return the credentials and the tokens file path."""
    previous = load_credentials(data_dir)
    credentials = Credentials(api_url=api_url, token=previous.token if previous else new_token())
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CREDENTIALS_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps({"api_url": credentials.api_url, "token": credentials.token}, indent=2))
    tokens = data_dir / TOKENS_FILE
    write_token_file(tokens, {"hydro-up-admin": ("admin", credentials.token)})
    return credentials, tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m manager_api.credentials``."""
    parser = argparse.ArgumentParser(prog="python -m manager_api.credentials", description=main.__doc__)
    parser.add_argument("data_dir", type=Path, help="where credentials.json and tokens.json go")
    parser.add_argument("api_url", help="the manager's URL as clients reach it, e.g. http://localhost:8081")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """``python -m manager_api.credentials DATA_DIR API_URL``: create (or keep) the admin token in DATA_DIR.

    For a manager started without `hydro up` (compose/): it then takes ``--tokens DATA_DIR/tokens.json``, and the
    CLI reads DATA_DIR/credentials.json (``--data-dir DATA_DIR``).
    """
    args = parse_args(argv)
    _, tokens = ensure_admin_credentials(args.data_dir, args.api_url)
    print(f"admin token in {args.data_dir / CREDENTIALS_FILE}; the manager takes --tokens {tokens}")


if __name__ == "__main__":
    main()
