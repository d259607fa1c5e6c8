#!/usr/bin/env python3
"""Compares two `nexus profile --samples` files made with the same shapes (say main and a kernel
variant, or two rounds): per lane and budget, the median ratio (B / A) of whole steps alone and
beside the other lane, matched by work, SMs and the other lane's work; then what the other lane
does to each lane's steps in each file (beside / alone of the same work, alone interpolated
between the budgets timed alone), by budget and, for prefill, by prompt shape.

    scripts/compare-beside.py A-measurements.json[.gz] B-measurements.json[.gz]"""
import gzip, json, statistics as st, sys, collections

def load(path):
    f = gzip.open(path, 'rt') if path.endswith('.gz') else open(path)
    m = json.load(f)['measurements']
    steps = collections.defaultdict(list)
    for s in m['steps']:
        key = (json.dumps(s['work'], sort_keys=True), s['sms'], json.dumps(s.get('other'), sort_keys=True))
        steps[key].append(s['seconds'])
    return {k: st.median(v) for k, v in steps.items()}

if len(sys.argv) != 3:
    sys.exit(__doc__)
a, b = load(sys.argv[1]), load(sys.argv[2])
ratio = collections.defaultdict(list)
for k, t in a.items():
    if k in b:
        kind = json.loads(k[0])['kind']
        ratio[(kind, 'beside' if k[2] != 'null' else 'alone', k[1])].append(b[k] / t)
print('| lane | alone or beside | SMs | steps | B / A (median) | p10 | p90 |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for key in sorted(ratio):
    r = sorted(ratio[key])
    print(f'| {key[0]} | {key[1]} | {key[2]} | {len(r)} | {st.median(r):.3f} | {r[len(r) // 10]:.3f} | {r[9 * len(r) // 10]:.3f} |')

def loss(steps):
    """Beside over alone, per lane and budget; alone interpolated linearly between the budgets
    timed alone (the both-lane pairs' prefill budgets are off the grid)."""
    alone = collections.defaultdict(dict)
    for k, t in steps.items():
        if k[2] == 'null':
            alone[k[0]][k[1]] = t
    out = collections.defaultdict(list)
    for k, t in steps.items():
        curve = alone.get(k[0])
        if k[2] == 'null' or not curve:
            continue
        sms = sorted(curve)
        lo = max([s for s in sms if s <= k[1]], default=None)
        hi = min([s for s in sms if s >= k[1]], default=None)
        if lo is None or hi is None:
            continue
        base = curve[lo] if hi == lo else curve[lo] + (k[1] - lo) / (hi - lo) * (curve[hi] - curve[lo])
        work = json.loads(k[0])
        out[(work['kind'], k[1], work['tokens'], int(work['kv_tokens']))].append(t / base)
    return out
la, lb = loss(a), loss(b)
median = lambda v: f'{st.median(v):.3f}' if v else '-'
print('\n| lane | SMs | beside / alone, A | B |')
print('| --- | --- | --- | --- |')
for lane, sms in sorted({(k[0], k[1]) for k in list(la) + list(lb)}):
    pick = lambda l: [r for k, v in l.items() if (k[0], k[1]) == (lane, sms) for r in v]
    print(f'| {lane} | {sms} | {median(pick(la))} | {median(pick(lb))} |')
print('\n| prefill (tokens x context) | SMs | beside / alone, A | B |')
print('| --- | --- | --- | --- |')
for key in sorted(k for k in set(la) | set(lb) if k[0] == 'prefill'):
    print(f'| {key[2]} x {key[3]} | {key[1]} | {median(la.get(key))} | {median(lb.get(key))} |')
