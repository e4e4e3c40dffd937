import { test } from "node:test";
import assert from "node:assert/strict";
import { compare, dominates, incremented, merged, normalized, only, isEmpty, clockGet } from "../dist/index.js";

test("increment, compare, merge and only, as clock.rs", () => {
  const a = incremented({}, "a");
  const ab = incremented(a, "b");
  assert.equal(compare(a, ab), "before");
  assert.equal(compare(ab, a), "after");
  assert.equal(compare(ab, { ...ab }), "equal");
  const b = incremented({}, "b");
  assert.equal(compare(a, b), "concurrent");
  assert.deepEqual(merged(a, b), { a: 1, b: 1 });
  assert.ok(dominates(merged(a, b), a) && dominates(merged(a, b), b));
  assert.ok(!dominates(a, b));
  assert.deepEqual(only({ a: 3, b: 2 }, "a"), { a: 3 });
  assert.deepEqual(only({ b: 2 }, "a"), {});
  assert.deepEqual(normalized({ z: 0, b: 1 }), { b: 1 });
  assert.equal(compare({ a: 0 }, {}), "equal");
  assert.ok(isEmpty({ a: 0 }));
  assert.equal(clockGet({}, "constructor"), 0, "no prototype keys leak in");
});

test("compare is antisymmetric and merge dominates both, over many random clocks", () => {
  let seed = 7;
  const rnd = (n) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
  const clock = () => {
    const c = {};
    for (const r of ["a", "b", "c", "d"]) if (rnd(2)) c[r] = rnd(5);
    return c;
  };
  const flip = { before: "after", after: "before", equal: "equal", concurrent: "concurrent" };
  for (let i = 0; i < 500; i++) {
    const x = clock();
    const y = clock();
    assert.equal(compare(y, x), flip[compare(x, y)]);
    const m = merged(x, y);
    assert.ok(dominates(m, x) && dominates(m, y));
  }
});
