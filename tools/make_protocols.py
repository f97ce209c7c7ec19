"""Regenerate the label-protocol tables in ``bids_app/data/protocols/``.

Run from the repository root with the FreeSurfer colour table (names and colours):

    python tools/make_protocols.py ../shared/data/labeled/oasis-trt-20/FreeSurferColorLUT.txt

Protocol tables are BIDS ``dseg.tsv`` files (``index`` = the value in the label image, which is the
FreeSurfer label value where one exists, ``name``, ``abbreviation``, ``color``). The row order is
the class order of the networks. Mapping tables (``mappings/<source>_to_<target>.tsv``) have the
columns ``source``, ``target`` and ``note``; ``target`` is a label of the target protocol or a
``|``-separated list of candidates, resolved voxel-wise to the nearest voxel that carries one of
them (used for non-lateralised labels such as WM hypointensities).
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bids_app" / "data" / "protocols"

LEFT = [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 26, 28]
RIGHT = [41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60]
MIDLINE = [14, 15, 16, 24]
ASEG = [0] + LEFT[:10] + [14, 15, 16] + LEFT[10:] + [24] + RIGHT
DEEP14 = [0, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58]
DKT31 = [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
         28, 29, 30, 31, 34, 35]
DKT_ASEG = [0] + [x for x in ASEG[1:] if x not in (3, 42)] + [1000 + i for i in DKT31] + [2000 + i for i in DKT31]

CEREBRUM7 = [
    (0, "background", "BG0", (0, 0, 0)),
    (1, "grey-matter", "GM", (205, 62, 78)),
    (2, "white-matter", "WM", (245, 245, 245)),
    (3, "CSF", "CSF", (60, 60, 60)),
    (4, "ventricles", "VEN", (120, 18, 134)),
    (5, "cerebellum", "CER", (230, 148, 34)),
    (6, "brainstem", "BST", (119, 159, 176)),
    (7, "basal-ganglia", "BGA", (12, 48, 255)),
]
# aseg label -> CEREBRUM class (MRBrainS-style grouping; see the note column of the table)
TO_CEREBRUM = {
    0: 0, 3: 1, 42: 1, 17: 1, 53: 1, 18: 1, 54: 1,
    2: 2, 41: 2, 28: 2, 60: 2,
    24: 3,
    4: 4, 5: 4, 43: 4, 44: 4, 14: 4, 15: 4,
    7: 5, 8: 5, 46: 5, 47: 5,
    16: 6,
    10: 7, 11: 7, 12: 7, 13: 7, 26: 7, 49: 7, 50: 7, 51: 7, 52: 7, 58: 7,
}
CEREBRUM_NOTE = {
    1: "cortex, hippocampus and amygdala are grey matter",
    2: "ventral diencephalon goes with white matter",
    7: "basal ganglia = thalamus, caudate, putamen, pallidum, accumbens",
}

# labels of source maps outside the aseg set -> aseg label or candidates
EXTRA_TO_ASEG = {
    25: ("2", "left lesion -> left cerebral WM"),
    57: ("41", "right lesion -> right cerebral WM"),
    30: ("2", "left vessel -> left cerebral WM"),
    62: ("41", "right vessel -> right cerebral WM"),
    31: ("4", "left choroid plexus -> left lateral ventricle"),
    63: ("43", "right choroid plexus -> right lateral ventricle"),
    72: ("14", "5th ventricle -> 3rd ventricle"),
    77: ("2|41", "WM hypointensities -> nearest cerebral WM"),
    78: ("2", "left WM hypointensities"),
    79: ("41", "right WM hypointensities"),
    80: ("2|41", "non-WM hypointensities -> nearest cerebral WM"),
    85: ("28|60", "optic chiasm -> nearest ventral DC"),
    136: ("11|12", "left caudate-putamen -> nearest of the two"),
    137: ("50|51", "right caudate-putamen -> nearest of the two"),
    163: ("10|11|12|13|26", "left subcortical GM -> nearest deep structure"),
    164: ("49|50|51|52|58", "right subcortical GM -> nearest deep structure"),
    251: ("2|41", "corpus callosum -> nearest cerebral WM"),
    252: ("2|41", "corpus callosum -> nearest cerebral WM"),
    253: ("2|41", "corpus callosum -> nearest cerebral WM"),
    254: ("2|41", "corpus callosum -> nearest cerebral WM"),
    255: ("2|41", "corpus callosum -> nearest cerebral WM"),
}
SYNTHSEG_EXTRA = [502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530]


def read_lut(path: str) -> dict[int, tuple[str, tuple[int, int, int]]]:
    lut = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].isdigit():
            lut[int(parts[0])] = (parts[1], (int(parts[2]), int(parts[3]), int(parts[4])))
    return lut


def abbreviation(name: str) -> str:
    name = name.replace("ctx-lh-", "L-ctx-").replace("ctx-rh-", "R-ctx-")
    name = name.replace("Left-", "L-").replace("Right-", "R-")
    return name


def write_protocol(name: str, rows: list[tuple[int, str, str, tuple[int, int, int]]]) -> None:
    lines = ["index\tname\tabbreviation\tcolor"]
    for index, label, abbr, rgb in rows:
        lines.append(f"{index}\t{label}\t{abbr}\t#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}")
    (OUT / f"{name}_dseg.tsv").write_text("\n".join(lines) + "\n")


def write_mapping(source: str, target: str, rows: list[tuple[int, str, str]]) -> None:
    folder = OUT / "mappings"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["source\ttarget\tnote"] + [f"{s}\t{t}\t{n}" for s, t, n in rows]
    (folder / f"{source}_to_{target}.tsv").write_text("\n".join(lines) + "\n")


def main(lut_path: str) -> None:
    lut = read_lut(lut_path)
    lut[0] = ("background", (0, 0, 0))

    def fs_rows(labels):
        return [(i, lut[i][0], "BG0" if i == 0 else abbreviation(lut[i][0]), lut[i][1]) for i in labels]

    write_protocol("aseg", fs_rows(ASEG))
    write_protocol("deep14", fs_rows(DEEP14))
    write_protocol("dkt-aseg", fs_rows(DKT_ASEG))
    write_protocol("cerebrum7", CEREBRUM7)

    # fine -> coarse merges
    dkt_to_aseg = [(0, "0", "")]
    for x in DKT_ASEG[1:]:
        if x >= 2000:
            dkt_to_aseg.append((x, "42", "right cortical region -> right cerebral cortex"))
        elif x >= 1000:
            dkt_to_aseg.append((x, "3", "left cortical region -> left cerebral cortex"))
        else:
            dkt_to_aseg.append((x, str(x), ""))
    write_mapping("dkt-aseg", "aseg", dkt_to_aseg)
    write_mapping("aseg", "cerebrum7",
                  [(s, str(t), CEREBRUM_NOTE.get(t, "")) for s, t in sorted(TO_CEREBRUM.items())])
    write_mapping("aseg", "deep14",
                  [(s, str(s) if s in DEEP14 else "0", "" if s in DEEP14 else "not a deep structure")
                   for s in ASEG])

    extras = [(s, t, n) for s, (t, n) in sorted(EXTRA_TO_ASEG.items())]
    # Mindboggle aparcNMMjt+aseg (DKT31 cortex + FreeSurfer aseg)
    mb = [(x, str(x), "") for x in DKT_ASEG]
    mb += [(1000, "|".join(str(1000 + i) for i in DKT31), "ctx-lh-unknown -> nearest left DKT region"),
           (2000, "|".join(str(2000 + i) for i in DKT31), "ctx-rh-unknown -> nearest right DKT region"),
           (3, "|".join(str(1000 + i) for i in DKT31), "unparcellated left cortex -> nearest left DKT region"),
           (42, "|".join(str(2000 + i) for i in DKT31), "unparcellated right cortex -> nearest right DKT region")]
    for hemi in (1000, 2000):
        side = "left" if hemi == 1000 else "right"
        mb += [(hemi + 1, str(hemi + 30), f"{side} banks of STS (DK) -> superior temporal (DKT)"),
               (hemi + 4, "2" if hemi == 1000 else "41", f"{side} corpus callosum cortex label -> cerebral WM"),
               (hemi + 32, str(hemi + 28), f"{side} frontal pole (DK) -> superior frontal (DKT)"),
               (hemi + 33, "|".join(str(hemi + i) for i in (6, 9, 15, 16, 30)),
                f"{side} temporal pole (DK) -> nearest of entorhinal, inferior/middle/superior temporal, parahippocampal")]
    mb += extras
    write_mapping("aparcNMMjt+aseg", "dkt-aseg", sorted(mb))
    # FreeSurfer aseg / SynthSeg label maps -> aseg
    fs = [(x, str(x), "") for x in ASEG] + extras
    fs += [(1000 + i, "3", "left cortical parcel -> left cortex") for i in range(0, 36)]
    fs += [(2000 + i, "42", "right cortical parcel -> right cortex") for i in range(0, 36)]
    write_mapping("freesurfer", "aseg", sorted(fs))
    ss = [(x, str(x), "") for x in ASEG] + extras
    ss += [(x, "0", "extra-cerebral tissue (synthesis only)") for x in SYNTHSEG_EXTRA]
    write_mapping("synthseg", "aseg", sorted(ss))


if __name__ == "__main__":
    main(sys.argv[1])
