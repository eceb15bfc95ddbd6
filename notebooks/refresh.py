"""Run the notebooks top to bottom and store them with their outputs, so that their plots show
when a notebook is browsed online. Each takes about a minute on a 2-core CPU.

    python notebooks/refresh.py                     # every notebook
    python notebooks/refresh.py 03_dmd.ipynb        # one (or a few)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def refresh(path: Path, timeout: int = 900) -> float:
    """Execute one notebook in its own folder and write it back with its outputs; returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   record_timing=False).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(names: list[str]) -> None:
    if "-h" in names or "--help" in names:
        print(__doc__)
        return
    if any(name.startswith("-") for name in names):
        raise SystemExit(f"error: unknown option {next(n for n in names if n.startswith('-'))}; "
                         "python notebooks/refresh.py [NOTEBOOK.ipynb ...]")
    try:
        import nbclient  # noqa: F401
    except ImportError:
        raise SystemExit("error: refreshing notebooks needs nbclient (pip install -r requirements.txt)") from None
    paths = [HERE / name for name in names] if names else sorted(HERE.glob("*.ipynb"))
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars in the stored outputs
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb" or path.parent.resolve() != HERE:
            raise SystemExit(f"error: no notebook {path.name} in {HERE}; name one of "
                             f"{', '.join(p.name for p in sorted(HERE.glob('*.ipynb')))}")
        print(f"{path.name}: {refresh(path):.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
