"""Quality-control mosaic of a synthetic (or any OpenBHB-layout) cohort: ``synth ... --qc PNG``.

One column per chosen subject (spread over ages and sites), an axial and a coronal slice through the
centre of the grid, titled with participant id, site and age. Rendered with matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainage_core.data.layout import subject_relpath
from brainage_core.errors import DataError


def choose_subjects(table: pd.DataFrame, count: int = 8) -> pd.DataFrame:
    """Up to ``count`` rows spread over the age range, preferring sites not already chosen."""
    ordered = table.sort_values(["age", "participant_id"]).reset_index(drop=True)
    if len(ordered) <= count:
        return ordered
    chosen: list[int] = []
    used_sites: set = set()
    for target in np.linspace(0, len(ordered) - 1, count):
        # nearest-in-age candidates first; take the first from an unused site if any
        candidates = sorted(range(len(ordered)), key=lambda i: (abs(i - target), i))[: max(3, len(ordered) // count)]
        pick = next((i for i in candidates if i not in chosen and ordered.at[i, "siteXacq"] not in used_sites), None)
        if pick is None:
            pick = next(i for i in candidates if i not in chosen)
        chosen.append(pick)
        used_sites.add(ordered.at[pick, "siteXacq"])
    return ordered.loc[sorted(chosen, key=lambda i: ordered.at[i, "age"])].reset_index(drop=True)


def _load_volume(folder: Path, row: pd.Series, fmt: str) -> np.ndarray:
    path = folder / subject_relpath(row["participant_id"], row["split"], fmt)
    if not path.is_file():
        raise DataError(f"{path}: missing volume of participant {row['participant_id']!r}; expected a file")
    if fmt == "openbhb":
        vol = np.load(path)
    else:
        import nibabel as nib

        vol = np.asarray(nib.load(str(path)).dataobj)
    return np.asarray(vol, dtype=np.float32).reshape(vol.shape[-3:])


def write_qc_mosaic(folder: str | Path, table: pd.DataFrame, png: str | Path, *, fmt: str = "openbhb",
                    count: int = 8) -> Path:
    """Write the mosaic of ``count`` subjects of the cohort in ``folder`` to ``png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder, png = Path(folder), Path(png)
    rows = choose_subjects(table, count)
    fig, axes = plt.subplots(2, len(rows), figsize=(2.0 * len(rows), 4.4), squeeze=False)
    for j, row in rows.iterrows():
        vol = _load_volume(folder, row, fmt)
        d, h, w = vol.shape
        # voxel x axis points left (negative affine entry): flip so the image shows radiological left-right
        axial = np.rot90(vol[::-1, :, int(w * 0.55)])
        coronal = np.rot90(vol[::-1, int(h * 0.55), :])
        for i, img in enumerate((axial, coronal)):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(f"{row['participant_id']}\nsite {row['siteXacq']} · {row['age']:.1f} y", fontsize=8)
    fig.suptitle(f"{folder.name}: {len(table)} subjects, {table['siteXacq'].nunique()} sites", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
