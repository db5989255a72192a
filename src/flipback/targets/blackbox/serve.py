"""Serve a model over the Open Inference Protocol (KServe v2 REST) with KServe's model server.

For benchmarks and tests: the same target that runs in process, served over HTTP by a real
server, so that figures can be compared and the network's cost measured.

    python -m flipback.targets.blackbox.serve --model resnet20=cifar_resnet20:cifar10_resnet20.th \\
        --num-classes 10 --http_port 8080 --enable_grpc false

    --model NAME=SPEC   (repeatable) any flipback SPEC: ARCH:WEIGHTS, FILE.pt, FILE.onnx, python:MOD:FN
    --uint8 NAME        that model takes UINT8 pixels 0..255 instead of FP32 in [0,1]
    --labels NAME       that model answers only INT64 top-1 labels (a hard-label API)
    --input-shape C,H,W when SPEC does not tell (TorchScript, callables)
    --threads N         CPU threads for the model (on 2 cores next to a busy client, 1 is fastest)
    --host ADDR         where to listen (default 127.0.0.1: loopback only)

Every option of KServe's model server is accepted too (--http_port, --enable_grpc, --workers ...).
Needs the `kserve` package (pip install kserve), imported only here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
import warnings

import numpy as np

from ...errors import FlipbackError
from .spec import load_backend


def _parse(argv=None):
    try:
        from kserve import model_server
    except ImportError:
        sys.exit("flipback serve needs KServe's model server: pip install kserve")
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SPEC")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--uint8", action="append", default=[], metavar="NAME")
    parser.add_argument("--labels", action="append", default=[], metavar="NAME")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (torch, onnxruntime)")
    parser.add_argument("--verbose", action="store_true", help="KServe's request logs")
    return parser.parse_args(argv)


def build_model(name: str, spec: str, num_classes: int, *, uint8: bool = False, labels_only: bool = False,
                input_shape=None):
    """A kserve.Model serving SPEC (loaded by flipback, in this process) under NAME."""
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput

    backend = load_backend(spec, num_classes, input_shape=input_shape)
    shape = backend.input_shape
    if shape is None or any(d is None for d in shape):
        raise FlipbackError(f"the input shape of {spec} is not known", hint="pass --input-shape C,H,W")
    c, h, w = shape

    class FlipbackModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.ready = True

        def get_input_types(self):
            return [{"name": "images", "datatype": "UINT8" if uint8 else "FP32", "shape": [-1, c, h, w]}]

        def get_output_types(self):
            if labels_only:
                return [{"name": "labels", "datatype": "INT64", "shape": [-1]}]
            return [{"name": "scores", "datatype": "FP32", "shape": [-1, num_classes]}]

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            if not isinstance(payload, InferRequest) or len(payload.inputs) != 1:
                raise InvalidInput("expected one input tensor")
            x = payload.inputs[0].as_numpy()
            if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
                raise InvalidInput(f"expected images of shape [-1, {c}, {h}, {w}], got {list(x.shape)}")
            if uint8:
                if x.dtype != np.uint8:
                    raise InvalidInput(f"expected UINT8, got {x.dtype}")
                x = x.astype(np.float32) / np.float32(255)  # exactly float32(k/255), as the client holds it
            else:
                x = np.ascontiguousarray(x, dtype=np.float32)
            # The model's answer goes out as it is (NaN included): checking it is the client's job.
            raw = np.asarray(backend.infer(x))
            if labels_only:
                lab = raw.argmax(1) if raw.ndim == 2 else raw
                out = InferOutput("labels", [len(lab)], "INT64")
                out.set_data_from_numpy(np.ascontiguousarray(lab, dtype=np.int64),
                                        binary_data=payload.use_binary_outputs)
            else:
                arr = np.ascontiguousarray(raw, dtype=np.float32)
                out = InferOutput("scores", list(arr.shape), "FP32")
                out.set_data_from_numpy(arr, binary_data=payload.use_binary_outputs)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=name, infer_outputs=[out],
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    return FlipbackModel()


def _listen_on(host: str) -> None:
    """KServe's REST server always listens on 0.0.0.0; make it listen on `host` (loopback by
    default), so that a test or benchmark server is not reachable from the network."""
    import uvicorn

    base = uvicorn.Config
    if getattr(base, "_flipback_host", None) is not None:
        return

    class Config(base):
        _flipback_host = host

        def __init__(self, app, *a, **kw):
            kw["host"] = host
            super().__init__(app, *a, **kw)

    uvicorn.Config = Config


def main(argv=None) -> None:
    args = _parse(argv)
    import kserve
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    models = []
    for item in args.model:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            sys.exit(f"--model takes NAME=SPEC, got '{item}'")
        try:
            models.append(build_model(name, spec, args.num_classes, uint8=name in args.uint8,
                                      labels_only=name in args.labels, input_shape=shape))
        except FlipbackError as exc:
            sys.exit(f"error: {exc}")
    _listen_on(args.host)
    from kserve import model_server
    model_server.args.configure_logging = args.verbose
    if not args.verbose:  # KServe's own deprecation notices, once per request otherwise
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=args.enable_grpc, enable_docs_url=False,
                       enable_latency_logging=False).start(models)


if __name__ == "__main__":
    main()
