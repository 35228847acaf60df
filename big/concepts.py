"""A user's concepts: list them, delete a private one, export its files, import files from another tool."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Sequence

from big import parsing
from big.errors import BadRequest, Conflict, NotFound
from big.models import ModelStore, model_key
from big.storage.registry import Registry, RequestSeen
from big.storage.versions import (EmbeddingWeights, LoraWeights, VersionMeta, check_magnitude, publish,
                                  read_lora_bytes, write_version)
from big.storage.workspace import Workspace
from big.training.identifiers import choose_identifier
from big.weights import embeddings
from big.weights.lora import LoraRuntime

EXPORT_FORMATS = ("all", "diffusers", "a1111")


def import_hash(category: str, identifier, files: Sequence[tuple[str, bytes]]) -> str:
    """What a retry of an /import has in common with its first try: its category, word and files (sha256)."""
    h = hashlib.sha256(json.dumps([category, identifier]).encode())
    for name, data in files:
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


class Concepts:
    def __init__(self, store: ModelStore, registry: Registry, ws: Workspace, *, identifier_pool, base_key: str):
        self.store, self.registry, self.ws = store, registry, ws
        self.identifier_pool = identifier_pool
        self.base_key = base_key

    @property
    def limits(self):
        return self.store.config.limits

    def _mine(self, user: str, identifier: str, what: str = "") -> dict:
        c = self.registry.find_concept(owner=user, target="private", identifier=identifier)
        if c is None:
            raise NotFound(f"you have no private concept {identifier!r}{what}")
        return c

    def list(self, user: str) -> list[dict]:
        return [{"identifier": c["identifier"], "category": c["category"], "target_model": c["target"],
                 "model_version": c["version"], "prompt": f"a {c['identifier']} {c['category']}",
                 "mine": c["owner"] == user, "n_images": c["n_images"], "method": self.store.concept(c).method}
                for c in self.registry.list_concepts(owner=user)]

    def delete(self, user: str, identifier: str) -> dict:
        c = self._mine(user, identifier, " (metamodel concepts cannot be unlearned)")
        with self.store.lock(c["model_key"]):
            self.registry.mark_concept_deleted(c["concept_id"])
            self.store.forget(c)
            self.ws.discard(self.ws.model_dir(c["model_key"]))
            self.ws.delete_instances(c["concept_id"])
        return {"identifier": identifier, "deleted": True}

    def export(self, user: str, identifier: str, fmt: str = "all") -> list[tuple[str, bytes]]:
        """A private concept's files as other tools read them: (file name, bytes)."""
        if fmt not in EXPORT_FORMATS:
            raise BadRequest(f"format must be one of {', '.join(EXPORT_FORMATS)}")
        version = self.store.concept(self._mine(user, identifier)).version
        files = version.files()
        if fmt == "diffusers":
            files = [f for f in files if f not in version.a1111_files()]
        elif fmt == "a1111":
            files = version.a1111_files()
            if not files:
                raise BadRequest("the AUTOMATIC1111 format is for embeddings (textual_inversion concepts)")
        size = sum(os.path.getsize(os.path.join(version.path, f)) for f in files)
        if size > self.limits.max_export_bytes:
            raise BadRequest(f"this concept is {size / 2**20:.0f} MiB (a DreamBooth concept is a whole UNet); the "
                             f"export limit is {self.limits.max_export_bytes / 2**20:.0f} MiB: train it as LoRA")
        out = []
        for f in files:
            with open(os.path.join(version.path, f), "rb") as fh:
                out.append((f, fh.read()))
        return out

    def _read_files(self, files: Sequence[tuple[str, bytes]]):
        """(LoRA state, its file's bytes, embedding vectors per text encoder) of an import; each may be None."""
        if not files or len(files) > 2:
            raise BadRequest("send one LoRA file, one embedding file, or one of each")
        lora_state, lora_bytes, embedding = None, None, None
        for name, data in files:
            if not data:
                raise BadRequest(f"{name or 'a file'} is empty")
            if len(data) > self.limits.max_import_bytes:
                raise BadRequest(f"{name}: {len(data) / 2**20:.1f} MiB; the import limit is "
                                 f"{self.limits.max_import_bytes / 2**20:.0f} MiB")
            state = read_lora_bytes(data, self.limits.max_weight_magnitude)
            if state is not None:
                if lora_state is not None:
                    raise BadRequest("one LoRA file per concept")
                lora_state, lora_bytes = state, data
            else:
                if embedding is not None:
                    raise BadRequest("one embedding file per concept")
                dims = tuple(e.get_input_embeddings().weight.shape[1] for e in self.store.text_side.encoders)
                embedding = embeddings.read_embedding_file(data, name or "", dims)[1]
                check_magnitude(embedding, self.limits.max_weight_magnitude, f"{name or 'the embedding'}")
        return lora_state, lora_bytes, embedding

    def import_(self, user: str, files: Sequence[tuple[str, bytes]], params: dict) -> dict:
        """A LoRA file and/or an embedding file from another tool (or /export) as a new private concept; sent
        again with its `idempotency_key`, the concept the first request made."""
        category = parsing.category_of(params)
        request_key = None
        if (key_word := parsing.request_key_of(params)) is not None:
            request_key = (key_word, import_hash(category, params.get("identifier"), files),
                           self.store.config.request_key_ttl_s)
            try:  # before the checks that the first request's own concept would now fail
                self.registry.seen_request(user, *request_key)
            except RequestSeen as seen:
                return self._imported_again(seen, key_word)
        lora_state, lora_bytes, embedding = self._read_files(files)
        self.store.check_quota(user, new_bytes=sum(len(data) for _, data in files))
        concept_id = uuid.uuid4().hex
        key = model_key("private", user, concept_id)
        tokenizers = self.store.text_side.tokenizers
        mine = self.store.private_words(user)
        identifier = params.get("identifier")
        if identifier is not None:
            identifier = parsing.word_of(identifier, "identifier must be one lowercase word")
            embeddings.word_token_everywhere(tokenizers, identifier)
            if identifier in mine:
                raise Conflict(f"you already have a concept {identifier!r}")
        else:
            identifier = choose_identifier(self.identifier_pool, mine, reserved_words=category.split())
        method = "lora" if lora_state is not None else "textual_inversion"
        names = [name for name, _ in files]
        if lora_state is not None:
            with self.store.loras.lock:  # the real check: do the keys and shapes fit this base model?
                self.store.loras.check(LoraRuntime.adapter_name(concept_id), lora_state)
        meta = VersionMeta(model_key_kind="private", base=self.base_key, version=1, identifier=identifier,
                           category=category, method=method, imported=names,
                           num_vectors=int(embedding[0].shape[0]) if embedding is not None else 0)
        lora = LoraWeights(file_bytes=lora_bytes) if lora_state is not None else None
        vectors = EmbeddingWeights(identifier, embedding[0], embeddings.word_token_everywhere(tokenizers, identifier),
                                   0, a1111=lora_state is None, vectors_2=embedding[1] if len(embedding) > 1 else None) \
            if embedding is not None else None
        try:
            with self.store.lock(key):
                self.registry.ensure_model(key, "private", user, self.base_key)
                publish(self.ws, key, 1, lambda folder: write_version(folder, meta, lora=lora, embedding=vectors),
                        lambda path: self.registry.commit_version(key, 1, path, None, {
                            "concept_id": concept_id, "owner": user, "target": "private", "identifier": identifier,
                            "category": category, "n_images": 0, "params": {"imported": names}},
                            request_key=request_key))
        except RequestSeen as seen:  # the same request, imported a moment ago through another replica
            self.ws.discard(self.ws.model_dir(key))
            return self._imported_again(seen, key_word)
        except BaseException:
            self.ws.discard(self.ws.model_dir(key))  # this concept's own model: nothing of it stays
            raise
        return {"identifier": identifier, "category": category, "target": "private", "model_version": 1,
                "method": method}

    def _imported_again(self, seen: RequestSeen, key: str) -> dict:
        """What the first /import with this idempotency key made; a Conflict if the key named another request or
        its concept has since been deleted."""
        concept = self.registry.get_concept(seen.answer)
        if not seen.same or concept is None or concept["status"] != "active":
            raise Conflict(f"idempotency_key {key!r} was already used for another /import request"
                           + ("" if not seen.same else " whose concept has since been deleted")
                           + "; send a new key with each new request")
        return {"identifier": concept["identifier"], "category": concept["category"], "target": "private",
                "model_version": concept["version"], "method": self.store.concept(concept).method}
