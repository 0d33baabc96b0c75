"""Model-based test of KVStore against dict (a hypothesis RuleBasedStateMachine).

Random puts, overwrites (same size: in place; other sizes: a new record), deletes, batch
calls, bulk growth (many bucket splits), clears, snapshots and their release; after every
step the live map must equal the dict and every live snapshot view must equal the dict as
it was when the snapshot was taken. The region is small (128 KiB in 512-byte pages), so
growth runs into a full region too: a KVFull must leave the map exactly as it was.
"""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import event, settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, multiple,
                                 precondition, rule)

import statecore as sc
from statecore.kv import KVFull, KVStore

SIZE = 128 * 1024
PAGE = 512
MAX_VIEWS = 3

key_st = st.binary(max_size=24)
value_st = st.one_of(st.binary(max_size=40), st.binary(max_size=700),
                     st.binary(min_size=500, max_size=1500))


class KVMachine(RuleBasedStateMachine):
    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.store = sc.Store(size=SIZE, page_size=PAGE)
        self.kv = KVStore(self.store)
        self.model: dict = {}
        self.views: list = []       # (view, the dict as of its snapshot)
        self.fresh = 0              # counter for keys made by grow()
        self.steps = 0

    # ---- keys ----------------------------------------------------------------------------
    @initialize(target=keys, ks=st.lists(key_st, min_size=1, max_size=8, unique=True))
    def seed_keys(self, ks):
        return multiple(*ks)

    @rule(target=keys, k=key_st)
    def new_key(self, k):
        return k

    # ---- single calls --------------------------------------------------------------------
    @rule(k=keys, v=value_st)
    def put(self, k, v):
        try:
            self.kv[k] = v
        except KVFull:
            return
        self.model[k] = v

    @rule(k=keys, data=st.data())
    def overwrite(self, k, data):
        if k not in self.model:
            return
        n = len(self.model[k])
        v = data.draw(st.one_of(st.binary(min_size=n, max_size=n), value_st))
        try:
            self.kv[bytearray(k)] = memoryview(v)
        except KVFull:
            return
        self.model[k] = v

    @rule(k=keys)
    def delete(self, k):
        if k in self.model:
            del self.kv[k]
            del self.model[k]
        else:
            try:
                del self.kv[k]
            except KeyError:
                return
            raise AssertionError(f"deleted {k!r}, which the model does not hold")

    @rule(k=keys)
    def get(self, k):
        assert self.kv.get(k) == self.model.get(k)
        assert (k in self.kv) == (k in self.model)

    # ---- batches -------------------------------------------------------------------------
    @rule(pairs=st.lists(st.tuples(keys, value_st), max_size=30))
    def put_many(self, pairs):
        try:
            self.kv.put_many([k for k, _ in pairs], [v for _, v in pairs])
        except KVFull:
            return      # all or nothing: the invariant checks that nothing changed
        self.model.update(pairs)

    @rule(ks=st.lists(keys, max_size=30), default=st.sampled_from([None, b"-"]))
    def get_many(self, ks, default):
        assert self.kv.get_many(ks, default) == [self.model.get(k, default) for k in ks]

    @rule(ks=st.lists(keys, max_size=30))
    def delete_many(self, ks):
        present = set(ks) & set(self.model)
        assert self.kv.delete_many(ks) == len(present)
        for k in present:
            del self.model[k]

    @rule(n=st.integers(50, 800), vlen=st.integers(0, 120))
    def grow(self, n, vlen):
        ks = [b"grow-%d" % (self.fresh + i) for i in range(n)]
        self.fresh += n
        vs = [bytes([i % 251]) * vlen for i in range(n)]
        try:
            self.kv.put_many(ks, vs)
        except KVFull:
            event("grow: region full")
            return
        event(f"grow: {len(self.model) // 500 * 500}+ keys before")
        self.model.update(zip(ks, vs))

    @rule(which=st.integers(0, 9))
    def clear(self, which):
        if which == 0:          # rarely: it throws away what growth built
            self.kv.clear()
            self.model.clear()

    # ---- snapshots -----------------------------------------------------------------------
    @precondition(lambda self: len(self.views) < MAX_VIEWS)
    @rule()
    def snapshot(self):
        self.views.append((self.kv.snapshot(), dict(self.model)))

    @precondition(lambda self: self.views)
    @rule(i=st.integers(0, MAX_VIEWS - 1))
    def release(self, i):
        view, _ = self.views.pop(i % len(self.views))
        view.close()

    @precondition(lambda self: self.views)
    @rule(i=st.integers(0, MAX_VIEWS - 1), ks=st.lists(keys, max_size=20))
    def read_view(self, i, ks):
        view, snap_model = self.views[i % len(self.views)]
        assert view.get_many(ks) == [snap_model.get(k) for k in ks]
        for k in ks[:5]:
            assert view.get(k) == snap_model.get(k)

    # ---- after every step -----------------------------------------------------------------
    @invariant()
    def map_equals_model(self):
        assert len(self.kv) == len(self.model)
        assert dict(self.kv.items()) == self.model
        for view, snap_model in self.views:
            assert len(view) == len(snap_model)
            assert dict(view.items()) == snap_model
        self.steps += 1
        if self.steps % 5 == 0:
            self.kv.verify()

    def teardown(self) -> None:
        self.kv.verify()
        for view, _ in self.views:
            view.verify()
            view.close()
        self.kv.close()
        self.store.close()


# Three times the profile's examples: each is cheap, and growth, full regions and views
# need long runs to meet.
KVMachine.TestCase.settings = settings(settings.default, stateful_step_count=60,
                                       max_examples=3 * settings.default.max_examples)
TestKVModel = KVMachine.TestCase
