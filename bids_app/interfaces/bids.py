"""A data sink that names derivatives from BIDS entities and writes them atomically."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)

from .. import bids as _bids

_EXTENSIONS = (".nii.gz", ".nii", ".mat", ".h5", ".svg", ".png", ".html", ".tsv", ".json")
_NO_SIDECAR = (".json", ".svg", ".png", ".html")


def _extension(path: str) -> str:
    name = Path(path).name
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            return ext
    return "".join(Path(path).suffixes)


class _SinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True, desc="root of the derivatives dataset")
    source_file = Str(mandatory=True, desc="raw input file: its subject/session/acq/run entities carry over")
    in_file = File(exists=True, mandatory=True, desc="the file to write")
    entities = traits.Dict(Str, traits.Any, usedefault=True, desc="entities added to the source's (desc, space, suffix...)")
    meta_dict = traits.Dict(Str, traits.Any, usedefault=True, desc="extra sidecar metadata")
    sources = traits.List(Str, desc="BIDS URIs of the files this one was computed from")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(desc="written derivative")
    out_meta = File(desc="written JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Copy ``in_file`` into the derivatives under its BIDS name, with a JSON sidecar (``Sources``)."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        entities = _bids.source_entities(self.inputs.source_file)
        entities.update(self.inputs.entities)
        entities.setdefault("extension", _extension(self.inputs.in_file))
        rel = _bids.derivative_path(entities)
        out = Path(self.inputs.base_directory) / rel
        _bids.atomic_copy(Path(self.inputs.in_file), out)
        self._results["out_file"] = str(out)
        if entities["extension"] not in _NO_SIDECAR:
            meta = dict(self.inputs.meta_dict)
            if self.inputs.sources:
                meta["Sources"] = list(self.inputs.sources)
            if meta:
                base = str(out)[: -len(entities["extension"])]
                sidecar = Path(base + ".json")
                _bids.atomic_write_json(sidecar, meta)
                self._results["out_meta"] = str(sidecar)
        return runtime
