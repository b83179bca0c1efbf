"""``sgl.RuntimeEndpoint``: programs run against a sglite (or SGLang) server's ``POST /generate``.

    >>> backend = sgl.RuntimeEndpoint("http://127.0.0.1:30000")   # doctest: +SKIP
    >>> sgl.set_default_backend(backend)                           # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sglite.lang.backends.native import NativeBackend
from sglite.lang.chat_template import ChatTemplate, resolve_chat_template
from sglite.runtime.prompts import is_text_prompt


class EndpointError(RuntimeError):
    """The server failed (5xx) or answered something that is not the native protocol."""


class RuntimeEndpoint(NativeBackend):
    """A remote engine as a program backend, over HTTP (``httpx``); SGLang's constructor signature.

    The chat template is ``chat_template_name`` (SGLang's keyword) or ``chat_template`` when given
    (a name such as ``"llama-3"`` or a ``ChatTemplate``), else guessed from the served model's path
    (``GET /get_model_info``, as SGLang's client does; ``/v1/models`` for servers without it), else
    ChatML. ``verify`` is the TLS check (a CA bundle path, or False). A 4xx answer (bad sampling
    parameter, invalid regex) raises ``ValueError`` with the server's message.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: str | bool | None = None,
        chat_template_name: str | None = None,
        chat_template: str | ChatTemplate | None = None,
        timeout: float = 600.0,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, verify=True if verify is None else verify
        )
        self.model_info = self._model_info()
        self.model_name = str(self.model_info.get("model_path") or "")
        self.chat_template = resolve_chat_template(chat_template or chat_template_name, self.model_name)

    def _model_info(self) -> dict[str, Any]:
        """SGLang's ``/get_model_info``; from ``/v1/models`` on servers without it."""
        import httpx

        try:
            response = self.client.get("/get_model_info")
            if response.status_code != 404:
                _raise_for_status(response.status_code, response.text)
                return response.json()
            response = self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise EndpointError(f"cannot reach {self.base_url}: {exc}") from exc
        models = (response.json().get("data") or []) if response.status_code == 200 else []
        return {"model_path": str(models[0].get("id", "")) if models else ""}

    def get_model_name(self) -> str:
        return self.model_name

    def _payload(
        self, prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs
    ) -> dict[str, Any]:
        payload = {
            "text" if is_text_prompt(prompt) else "input_ids": prompt,
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
        }
        if return_text_in_logprobs:  # only when asked: servers without the option still work otherwise
            payload["return_text_in_logprobs"] = True
        return payload

    def _generate(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ):
        payload = self._payload(
            prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs
        )
        response = self.client.post("/generate", json=payload)
        _raise_for_status(response.status_code, response.text)
        return _restore_tuples(response.json())

    def _generate_stream(
        self, prompt, sampling_params, return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        return_text_in_logprobs=False,
    ) -> Iterator[dict]:
        payload = self._payload(
            prompt, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs
        )
        with self.client.stream("POST", "/generate", json={**payload, "stream": True}) as response:
            if response.status_code >= 400:
                _raise_for_status(response.status_code, response.read().decode("utf-8", "replace"))
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (keep-alives)
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EndpointError(f"the server failed mid-stream: {chunk['error']}")
                yield _restore_tuples(chunk)

    def encode(
        self, prompt: str | list[str] | list[int] | list[list[int]], dimensions: int | None = None
    ) -> dict | list[dict]:
        """Embed through the server's ``POST /encode`` (SGLang's route): ``{"embedding", "meta_info"}`` per input.
        The server needs an embedding model (``--embedding-model PATH``, or an embedding model as ``--model``)."""
        payload: dict[str, Any] = {"text" if is_text_prompt(prompt) else "input_ids": prompt}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        response = self.client.post("/encode", json=payload)
        _raise_for_status(response.status_code, response.text)
        return response.json()

    def flush_cache(self) -> bool:
        response = self.client.post("/flush_cache")
        return response.status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        for path in ("/server_info", "/get_server_info"):  # SGLang's current route, then its older name
            response = self.client.get(path)
            if response.status_code != 404:
                _raise_for_status(response.status_code, response.text)
                return response.json()
        return {"base_url": self.base_url, "model_path": self.model_name}

    def shutdown(self) -> None:
        """Close the HTTP connections (the server keeps running)."""
        self.client.close()


def _raise_for_status(status: int, body: str) -> None:
    if status < 400:
        return
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:500]
    if status < 500:
        raise ValueError(f"the server rejected the request ({status}): {message}")
    raise EndpointError(f"the server failed ({status}): {message}")


def _restore_tuples(value: Any) -> Any:
    """JSON turns the engine's ``(logprob, token_id, text)`` tuples into lists; make them tuples again."""
    if isinstance(value, list):
        return [_restore_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore_logprobs(k, v) for k, v in value.items()}
    return value


def _restore_logprobs(key: str, value: Any) -> Any:
    if key == "meta_info" and isinstance(value, dict):
        return {k: _as_tuples(v) if k.endswith("logprobs") else v for k, v in value.items()}
    return _restore_tuples(value)


def _as_tuples(value: Any) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], list) and value[0] and not isinstance(value[0][0], list):
        return [tuple(v) for v in value]
    if isinstance(value, list):
        return [_as_tuples(v) for v in value]
    return value
