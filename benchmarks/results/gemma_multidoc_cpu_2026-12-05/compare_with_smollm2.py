import json, glob
from cas.eval.stats import paired_by_qid, paired_difference, wilson_interval
g = {}
for f in glob.glob('/tmp/gem_min1/eval/partial/*.json'):
  r = json.load(open(f)); r = r.get('row', r); g[r['method']] = r['questions']
R = json.load(open('/tmp/cs0/base_minutes_s0/eval/results.json'))
s = {v['method']: v['questions'] for v in R['methods']}
for m in ('icl', 'icl_composed@2'):
  if m not in g: continue
  a, b = paired_by_qid(g[m], s[m])
  d = paired_difference(a, b)
  k = int(sum(a)); n = len(a)
  print(m, 'gemma', round(100*sum(a)/n,1), [round(100*x) for x in wilson_interval(k, n)], 'smol', round(100*sum(b)/n,1), 'n', n, 'gemma-smol %+.1f (%+.1f to %+.1f)' % tuple(100*x for x in d))
