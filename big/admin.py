"""The public metamodel's keeper: an admin lists its concepts with their authors, retires one and restores it.

A concept taught by the `adapters` strategy is its own adapter, so retiring it writes a new version whose stack
routes no prompt to it: every other concept and every base prompt is served exactly as before, the concept's files
and history are kept, and earlier versions still reproduce the images they made. Restoring writes another version
with the adapter back in its place. A concept learned into the trunk by DreamBooth cannot be taken out this way.
"""
from __future__ import annotations

from big.errors import BadRequest, Conflict, NotFound
from big.models import ModelStore
from big.storage.registry import Registry, VersionMovedOn
from big.storage.versions import VersionMeta, publish, write_version
from big.storage.workspace import Workspace
from big.weights import metamodel

META = "meta"


class MetamodelKeeper:
    def __init__(self, store: ModelStore, registry: Registry, ws: Workspace, *, base_key: str):
        self.store, self.registry, self.ws = store, registry, ws
        self.base_key = base_key

    def concepts(self) -> list[dict]:
        """Every concept the public metamodel was taught, retired ones too, with who taught it."""
        model = self.registry.get_model(META)
        stack = self.store.stack(META, model["current_version"]) if model else metamodel.EMPTY
        routed = {a.concept_id for a in stack.adapters}
        return [{"identifier": c["identifier"], "category": c["category"], "author": c["owner"],
                 "model_version": c["version"], "status": c["status"],
                 "kind": "adapter" if self.store.concept(c).method == "lora" else "trunk",
                 "routed": c["concept_id"] in routed}
                for c in self.registry.concepts_of_model_any_status(META) if c["status"] in ("active", "retired")]

    def retire(self, identifier: str) -> dict:
        return self._change(identifier, retire=True)

    def restore(self, identifier: str) -> dict:
        return self._change(identifier, retire=False)

    def _change(self, identifier: str, *, retire: bool) -> dict:
        with self.store.lock(META):
            concept = next((c for c in self.registry.concepts_of_model_any_status(META)
                            if c["identifier"] == identifier and c["status"] in ("active", "retired")), None)
            if concept is None:
                raise NotFound(f"the metamodel has no concept {identifier!r}")
            if self.store.concept(concept).method != "lora":
                raise BadRequest(f"{identifier!r} was learned into the trunk by DreamBooth: only a concept that is its "
                                 "own adapter (strategy 'adapters') can be retired")
            if concept["status"] == ("retired" if retire else "active"):
                raise Conflict(f"{identifier!r} is already {'retired' if retire else 'routed'}")
            version = self.registry.get_model(META)["current_version"]
            stack = self.store.stack(META, version)
            adapter = metamodel.Adapter(concept["version"], concept["concept_id"], concept["identifier"])
            others = tuple(a for a in stack.adapters if a.concept_id != adapter.concept_id)
            # Restored in the order it was taught, so each route sums its adapters as it did before.
            adapters = others if retire else tuple(sorted(others + (adapter,), key=lambda a: a.version))
            meta = VersionMeta(model_key_kind=META, base=self.base_key, version=version + 1,
                               identifier=identifier, category=concept["category"],
                               method="retire" if retire else "restore", trunk_version=stack.trunk_version,
                               adapters=metamodel.Stack(stack.trunk_version, adapters).to_meta()["adapters"])
            status = (concept["concept_id"], "retired" if retire else "active")
            try:
                publish(self.ws, META, version + 1, lambda folder: write_version(folder, meta),
                        lambda path: self.registry.commit_version(META, version + 1, path, None, None,
                                                                  concept_status=status))
            except VersionMovedOn as e:  # a worker committed a new concept this very moment
                raise Conflict(f"the metamodel changed while {identifier!r} was being "
                               f"{'retired' if retire else 'restored'}; send it again") from e
        return {"identifier": identifier, "status": "retired" if retire else "active", "model_version": version + 1}
