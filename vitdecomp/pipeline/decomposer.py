"""The model stage: a callable class for Ray Data ``map_batches`` (one model per actor)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import VitdecompError
from ..store.schema import passthrough_names, rows_table
from .placement import node_id


class DecomposeWorker:
    """Actor: loads the model (and teacher) once, decomposes batches of preprocessed pixels."""

    def __init__(self, spec: dict):
        import importlib

        import torch

        from ..models import load_model

        for module in spec.get("extensions", ()):     # architectures registered by extensions (the toy world)
            importlib.import_module(module)
        self.spec = spec
        dev = spec["device"]
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.lm = load_model(spec["model"], pretrained=spec["pretrained"] or False, checkpoint=spec["checkpoint"],
                             device=self.device, seed=spec.get("seed", 0))
        self.teacher = None
        if spec["teacher"]:
            self.teacher = load_model(spec["teacher"], pretrained=spec["teacher_pretrained"] or False,
                                      checkpoint=spec["teacher_checkpoint"], device=self.device,
                                      seed=spec.get("seed", 0))
        self.size = (3, *self.lm.image_size)
        self.tsize = (3, *self.teacher.image_size) if self.teacher else None
        self.schema = pa.ipc.read_schema(pa.py_buffer(spec["schema"]))
        self.node = node_id()
        self.codec = None                       # compact layout: heads stored as basis coordinates
        if spec.get("compact"):
            from ..store.compact import CompactLayout

            self.codec = CompactLayout.from_bytes(spec["basis"], spec["compact"], "the decompose job's basis")
        self.checked = False

    def __call__(self, t: pa.Table) -> pa.Table:
        import torch

        from ..engine import decompose, plan_for

        ok = pc.is_null(t.column("_error")).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(ok)
        n, spec = t.num_rows, self.spec
        d = self.lm.readout.dim
        K = len(spec["components"])
        contrib = np.zeros((n, K, d), np.float32)
        readout = np.zeros((n, d), np.float32)
        offset = np.zeros((n, d), np.float32)
        teacher = np.zeros((n, self.teacher.readout.dim), np.float32) if self.teacher else None
        if len(idx):
            px = t.column("_pixels").to_pylist()
            x = torch.from_numpy(np.stack([np.frombuffer(px[i], np.float32).reshape(self.size) for i in idx]))
            x = x.to(self.device)
            if spec["readout_only"]:
                with torch.inference_mode():
                    z = plan_for(self.lm.vision).readout(x).float()
                readout[idx] = z.cpu().numpy()
            else:
                dec = decompose(self.lm, x, blocks=spec["blocks"], heads=spec["heads"],
                                   convention=spec["convention"], normalize=spec["normalize"])
                if dec.names != spec["components"]:
                    raise VitdecompError("the worker's component list differs from the manifest's; "
                                         "driver and workers must run the same vitdecomp and model")
                contrib[idx] = dec.contributions.float().cpu().numpy()
                readout[idx] = dec.readout.float().cpu().numpy()
                if dec.offset is not None:
                    offset[idx] = dec.offset.float().cpu().numpy()
                if self.codec is not None and not self.checked:   # the bases fit this actor's model
                    self._check(dec)
            if self.teacher is not None:
                tp = t.column("_tpixels").to_pylist()
                tx = torch.from_numpy(np.stack([np.frombuffer(tp[i], np.float32).reshape(self.tsize) for i in idx]))
                with torch.inference_mode():
                    e = self.teacher.model.encode_image(tx.to(self.device), normalize=True).float()
                teacher[idx] = e.cpu().numpy()
        # the store's rows (vectors null where decoding failed), built as Store.append builds them
        names = [] if spec["readout_only"] else spec["components"]
        rows = rows_table(self.schema, names, t.column("image_id").to_pylist(),
                          t.column("uri").to_pylist() if "uri" in t.column_names else None,
                          {c: t.column(c) for c in passthrough_names(self.schema)}, readout,
                          contrib if names else None, teacher, valid=ok, codec=self.codec if names else None,
                          offset=offset)
        out = {c: rows.column(c) for c in rows.column_names}
        out["_error"] = t.column("_error")
        if "_decode_node" in t.column_names:
            out["_decode_node"] = t.column("_decode_node")
        out["_model_node"] = pa.array([self.node] * n, pa.string())
        return pa.table(out)

    def _check(self, dec) -> None:
        """Once per actor: the compact bases reconstruct this model's head contributions (fp64 check)."""
        from ..store.compact import VERIFY_TOL

        off = dec.offset.double().cpu().numpy() if dec.offset is not None else None
        errs = self.codec.residual(dec.names, dec.contributions.double().cpu().numpy(), off)
        worst = max(errs, key=errs.get)
        if errs[worst] > 10 * VERIFY_TOL:
            raise VitdecompError(f"the store's compact basis does not fit the model this worker loaded ({worst}: "
                                 f"relative error {errs[worst]:.1e}); driver and workers must load the same weights")
        self.checked = True


