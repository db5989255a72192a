"""A model server speaking the Open Inference Protocol (KServe v2 REST; also Triton and MLServer).

Tensors travel in the protocol's binary tensor extension by default (KServe, Triton); add
`?encoding=json` to the model URL for a server that only takes JSON tensors (exact too: float32
values survive JSON's decimal form). `?output=NAME` picks the output when a model has several.

The tensors are encoded and decoded by tritonclient's public codec
(`InferenceServerClient.generate_request_body` / `parse_response_body`, with the binary tensor
extension), and each request is sent by urllib3 with its own retries switched off. We do not
use tritonclient's own gevent transport because the accountant must see every attempt (its
connection pool may re-send a request by itself), its errors drop the Retry-After header, and
gevent clients cannot be shared across threads.

Credentials: the environment variable FLIPBACK_SERVER_TOKEN, or the file named by
FLIPBACK_SERVER_TOKEN_FILE, is sent as `Authorization: Bearer ...`. It is never logged and never
part of an error message. FLIPBACK_SERVER_CA names a CA bundle for https servers with their own CA.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np

from ...errors import ModelError
from .base import LOSSY_INPUT_TYPES, Backend, BackendFailure, encode_pixels, normalizer, pick_layout
from .onnx import _pick_output

TOKEN_ENV = "FLIPBACK_SERVER_TOKEN"
TOKEN_FILE_ENV = "FLIPBACK_SERVER_TOKEN_FILE"
CA_ENV = "FLIPBACK_SERVER_CA"
FLOAT_DATATYPES = ("FP32", "FP64")


def is_server_spec(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def read_token() -> str | None:
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ModelError(f"cannot read the token file named by {TOKEN_FILE_ENV} ({exc.strerror})") from None
        if not token:
            raise ModelError(f"the token file named by {TOKEN_FILE_ENV} is empty")
        return token
    return None


def parse_server_spec(spec: str):
    """http(s)://HOST:PORT/v2/models/NAME[/versions/V][?output=NAME][&encoding=binary|json] ->
    (scheme, host, port, name, version, output, binary)."""
    parts = urlsplit(spec)
    hint = "use http(s)://HOST:PORT/v2/models/NAME"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"cannot read server spec '{spec}'", hint=hint)
    if parts.username or parts.password:
        raise ModelError("put no credentials in the server URL", hint=f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}")
    segs = [s for s in parts.path.split("/") if s]
    if len(segs) not in (3, 5) or segs[:2] != ["v2", "models"] or (len(segs) == 5 and segs[3] != "versions"):
        raise ModelError(f"cannot read server spec '{spec}': the path must be /v2/models/NAME", hint=hint)
    try:
        port = parts.port
    except ValueError:
        raise ModelError(f"bad port in '{spec}'", hint=hint) from None
    query = parse_qs(parts.query)
    unknown = set(query) - {"output", "encoding"}
    if unknown:
        raise ModelError(f"unknown option '{sorted(unknown)[0]}' in server spec", hint="known: output, encoding")
    output = query.get("output", [None])[0]
    encoding = query.get("encoding", ["binary"])[0]
    if encoding not in ("binary", "json"):
        raise ModelError(f"unknown encoding '{encoding}' in server spec", hint="use encoding=binary or encoding=json")
    return (parts.scheme, parts.hostname, port, segs[2], segs[4] if len(segs) == 5 else None, output,
            encoding == "binary")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(data: bytes) -> str:
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
        text = (obj.get("error") or obj.get("detail") or "") if isinstance(obj, dict) else obj
    except ValueError:
        text = data.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return f": {text[:200]}" if text else ""


class OipBackend(Backend):
    """One model on an Open Inference Protocol server. Checks at construction (before any work):
    the server is ready, the model exists and is ready, its input is one image tensor whose
    shape fits, and its output gives num_classes scores (or labels)."""

    remote = True
    default_batch = 64

    def __init__(self, spec: str, num_classes: int, *, timeout: float = 10.0, mean=None, std=None,
                 max_batch: int | None = None, startup_retries: int = 3, backoff: float = 0.5,
                 sleep=time.sleep):
        try:
            import tritonclient.http  # noqa: F401  (the protocol's codec, used in infer)
            import urllib3
        except ImportError as exc:
            raise ModelError(f"model-server targets need tritonclient[http] and urllib3 ({exc})",
                             hint="pip install 'tritonclient[http]'") from None
        self._u3 = urllib3
        scheme, host, port, name, version, output, self.binary = parse_server_spec(spec)
        self.name = name
        shown_host = f"[{host}]" if ":" in host else host
        self.base = f"{scheme}://{shown_host}" + (f":{port}" if port else "")
        self.model_path = f"/v2/models/{quote(name, safe='')}"
        if version:
            self.model_path += f"/versions/{quote(version, safe='')}"
        self.description = f"server {self.base}{self.model_path}"
        self.timeout = timeout
        headers = {"Accept": "application/json, application/octet-stream"}
        token = read_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs = {}
        if scheme == "https" and os.environ.get(CA_ENV):
            kwargs["ca_certs"] = os.environ[CA_ENV]
        self._headers = headers  # sent with every request (urllib3 replaces, not merges, per-request headers)
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=1, retries=False,
                                        timeout=urllib3.Timeout(connect=timeout, read=timeout), **kwargs)
        self._sleep = sleep
        try:
            self._startup(num_classes, output, mean, std, max_batch, startup_retries, backoff)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ load-time checks

    def _startup(self, num_classes, output, mean, std, max_batch, retries, backoff):
        self._get("/v2/health/ready", "is not ready", retries, backoff)
        meta = self._get(self.model_path, "has no such model", retries, backoff, want_json=True)
        if not (isinstance(meta, dict) and isinstance(meta.get("inputs"), list)
                and isinstance(meta.get("outputs"), list)):
            raise ModelError(f"{self.description} returned model metadata without inputs and outputs")
        self._get(self.model_path + "/ready", "says the model is not ready", retries, backoff)
        inputs = meta["inputs"]
        if len(inputs) != 1:
            raise ModelError(f"{self.description} has {len(inputs)} inputs; flipback needs one image input")
        inp = inputs[0]
        try:
            self.input_name = str(inp["name"])
            self.datatype = str(inp["datatype"]).upper()
            shape = [int(d) for d in inp["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{self.description} returned malformed input metadata: {inp!r:.200}") from None
        if self.datatype in LOSSY_INPUT_TYPES:
            raise ModelError(f"{self.description} takes {self.datatype} inputs, which cannot hold 8-bit pixel "
                             "values exactly", hint="serve the model with FP32 or UINT8 input")
        if self.datatype not in FLOAT_DATATYPES + ("UINT8",):
            raise ModelError(f"{self.description} takes {self.datatype} inputs", hint="serve FP32, FP64 or UINT8 input")
        self.layout, self.input_shape = pick_layout(shape, self.description)
        if self.input_shape == (None, None, None):
            self.input_shape = None
        if shape[0] > 0:  # a fixed batch dimension
            if shape[0] != 1:
                raise ModelError(f"{self.description} takes batches of exactly {shape[0]} images",
                                 hint="serve it with a variable batch dimension (-1)")
            self.max_batch = 1
        if self.datatype == "UINT8" and (mean is not None or std is not None):
            raise ModelError(f"{self.description} takes 8-bit pixels; it cannot take a mean/std normalization")
        self._norm = normalizer(mean, std)
        outs = []
        for o in meta["outputs"]:
            try:
                outs.append((str(o["name"]), str(o["datatype"]), [int(d) for d in o["shape"]]))
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{self.description} returned malformed output metadata: {o!r:.200}") from None
        if output is not None:
            outs = [o for o in outs if o[0] == output]
            if not outs:
                raise ModelError(f"{self.description} has no output named '{output}'")
        self.output_name, self.num_classes, self.returns_scores = _pick_output(outs, num_classes, self.description)
        # Triton publishes its batch limit in the model configuration; KServe and MLServer answer 404.
        try:
            config = self._request("GET", self.model_path + "/config")
            if config.status == 200:
                mbs = json.loads(config.data).get("max_batch_size")
                if isinstance(mbs, int) and mbs > 0:
                    self.max_batch = min(mbs, self.max_batch or mbs)
        except (BackendFailure, ValueError, AttributeError):
            pass
        if max_batch:
            self.max_batch = min(max_batch, self.max_batch or max_batch)

    def _get(self, path: str, what: str, retries: int, backoff: float, want_json: bool = False):
        last, answered = "", False
        for attempt in range(retries + 1):
            if attempt:
                self._sleep(min(8.0, backoff * 2 ** (attempt - 1)))
            try:
                resp = self._request("GET", path)
            except BackendFailure as exc:
                last = exc.message
                continue
            answered = True
            if resp.status in (401, 403):
                raise ModelError(f"{self.description} refused the credentials (HTTP {resp.status})",
                                 hint=f"set {TOKEN_ENV} or {TOKEN_FILE_ENV} to a valid token")
            if resp.status == 200:
                if not want_json:
                    return None
                try:
                    return json.loads(resp.data)
                except ValueError:
                    raise ModelError(f"{self.description} returned malformed JSON for GET {path}") from None
            last = f"HTTP {resp.status}{_error_text(resp.data)}"
            if resp.status == 404 or (400 <= resp.status < 500 and resp.status not in (408, 429)):
                break
        if not answered:
            what = "cannot be reached"
        raise ModelError(f"{self.description} {what} (GET {path}: {last})",
                         hint="check the URL and that the server is up and has loaded the model")

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        u3 = self._u3.exceptions
        try:
            return self.pool.request(method, self.base + path, body=body, headers={**self._headers, **(headers or {})},
                                     retries=False, redirect=False)
        except (u3.NewConnectionError, u3.ConnectTimeoutError) as exc:
            raise BackendFailure(f"cannot connect to {self.base} ({_reason(exc)})", evaluated=False,
                                 retryable=True) from None
        except u3.ReadTimeoutError:
            raise BackendFailure(f"no answer from {self.base} within {self.timeout:g} s", evaluated=True,
                                 retryable=True) from None
        except u3.SSLError as exc:
            raise BackendFailure(f"TLS error with {self.base} ({_reason(exc)})", evaluated=False, retryable=False,
                                 hint=f"check the certificate, or set {CA_ENV} to the server's CA bundle") from None
        except (u3.ProtocolError, u3.HTTPError, OSError) as exc:
            raise BackendFailure(f"connection to {self.base} broken ({_reason(exc)})", evaluated=True,
                                 retryable=True) from None

    def infer(self, x: np.ndarray) -> np.ndarray:
        from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
        if self._norm:
            x = self._norm(x)
        arr = encode_pixels(x, self.datatype, self.layout)
        inp = InferInput(self.input_name, list(arr.shape), self.datatype)
        inp.set_data_from_numpy(arr, binary_data=self.binary)
        outs = [InferRequestedOutput(self.output_name, binary_data=self.binary)]
        body, header_length = InferenceServerClient.generate_request_body([inp], outputs=outs)
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(header_length)}
        resp = self._request("POST", self.model_path + "/infer", body=body, headers=headers)
        status = resp.status
        if status == 200:
            return self._decode(resp)
        detail = f"HTTP {status}{_error_text(resp.data)}"
        if status in (401, 403):
            raise ModelError(f"{self.description} refused the credentials ({detail})",
                             hint=f"set {TOKEN_ENV} or {TOKEN_FILE_ENV} to a valid token")
        if status == 429:
            raise BackendFailure(f"{self.description} is rate limiting ({detail})", evaluated=False, retryable=True,
                                 retry_after=_retry_after(resp.headers.get("Retry-After")))
        if status == 413:
            raise BackendFailure(f"{self.description} refused a batch of {len(x)} as too large ({detail})",
                                 evaluated=False, retryable=False, too_large=True)
        if status == 404:  # the model may be reloading after a restart
            raise BackendFailure(f"{self.description} does not know the model now ({detail})", evaluated=False,
                                 retryable=True)
        if status >= 500 or status == 408:
            raise BackendFailure(f"{self.description} failed ({detail})", evaluated=True, retryable=True,
                                 retry_after=_retry_after(resp.headers.get("Retry-After")))
        raise BackendFailure(f"{self.description} rejected the request ({detail})", evaluated=status == 400,
                             retryable=False)

    def _decode(self, resp) -> np.ndarray:
        from tritonclient.http import InferenceServerClient
        length = resp.headers.get("Inference-Header-Content-Length")
        try:
            result = InferenceServerClient.parse_response_body(resp.data, header_length=int(length) if length else None)
            out = result.as_numpy(self.output_name)
        except Exception as exc:
            raise BackendFailure(f"{self.description} sent a malformed answer ({type(exc).__name__}: "
                                 f"{str(exc)[:120]})", evaluated=True, retryable=False) from None
        if out is None:
            raise BackendFailure(f"{self.description} sent an answer without output '{self.output_name}'",
                                 evaluated=True, retryable=False)
        return out

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.clear()


def _reason(exc) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    return " ".join(text.split())[:160]
