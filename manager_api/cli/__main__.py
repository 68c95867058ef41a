"""``python -m manager_api.cli``: the same as the `hydro` console script."""

from manager_api.cli import main

if __name__ == "__main__":
    main()
