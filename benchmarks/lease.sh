#!/usr/bin/env bash
# One GPU lease, several research jobs side by side (each detached, so a call returns at once and the
# jobs outlive it; the machine stays held while calls keep coming). After `. benchmarks/gpu_setup.sh`
# (SmolLM2 for every job; Gemma's six parts too for gemma_minutes):
#   bash benchmarks/lease.sh start "prose_sal head32 gemma_minutes q21"   # any subset, in this order
#   bash benchmarks/lease.sh status        # progress of every job (repeat: `sleep 500; ... status`); with $OUT
#                                          # set, as in a device call, it also collects (below; COLLECT=0: not)
#   bash benchmarks/lease.sh then "seq" "mono512"   # start mono512 (as `start` would) as soon as seq has ended;
#                                          # source gpu_setup.sh in that call too (its jobs need the same environment)
#   OUT=$OUT bash benchmarks/lease.sh collect   # each job's archive into $OUT/<job>/ (what has finished)
#       collect in every waiting call, not only the last (`status` does it when $OUT is set): a machine can be
#       taken back mid-run, and what no call brought back is lost (2026-12-06: a whole k20/head32 study)
#   OUT=$OUT bash benchmarks/lease.sh castep   # the study's CAS step under remat full / none / dots (alone, ~2 min)
#   OUT=$OUT MODELS=smollm2-135m bash benchmarks/lease.sh decode   # issue 22's decode levers, in the
#       foreground and alone on the GPU (timings): run it before `start`, not beside the jobs
# Jobs (memory fractions of an H200 below; on a smaller card each is scaled up by 143 GB / its memory,
# and `start` refuses a set of jobs whose scaled shares exceed 0.97 of the card, saying which fit):
#   prose_s2k      issue 26: walk64s2k_parts1k (2,000 steps per parts run) and walkq64_parts1k (fact questions
#                  beside the quotes), seeds 0 and 1 (prose_sweep.sh; PROSE_VARIANTS= picks others)
#   prose_sal      issue 26: walk64sal_parts1k (the init reads each part's most salient sentences; ran
#                  2026-12-05 on an H100: oracle 82.5 vs ICL 92.3 over three seeds, RESULTS.md) and
#                  walk64cos_parts1k, seeds 0 and 1, processes without preallocation
#   prose_cos      issue 26: walk64cos_parts1k (per-cartridge cosine lr decay; 2,000 steps lost, the loss was flat
#                  at the constant lr) and walkq64_parts1k, seeds 0 and 1, processes without preallocation
#   head32         issue 20: the frozen-header lever on patients and minutes, seeds 0 and 1, with its base
#                  (HEAD32_VARIANTS=head32: the lever alone; its base ran 2026-12-06, quiet_h100_2026-12-06/head32_partial.tgz)
#   seq            issue 20: sequential positions in training and at test time (CAS + isolated, both read
#                  sequentially) on minutes and patients, seeds 0 and 1, spread questions; pair it with the base
#                  runs of the silent study / head32's archive (`compose_report --archive=<base> --archive=<seq>`);
#                  only the oracle and the composed rows are evaluated (SEQ_METHODS=; HEAD32_METHODS= does the same for
#                  head32, e.g. with HEAD32_VARIANTS=head32: its base's other rows are in the 2026-12-06 archive).
#                  Ran 2026-12-06 on an H100 (17 min beside builtin6): composed@10 +4.2 for CAS and isolated alike,
#                  the gap unchanged (+4.6; RESULTS.md "Sequential positions"). For a third collection:
#                  SEQ_VARIANTS=base,seq SEQ_COLLECTIONS=products (products has no base run of this recipe); ran 2026-12-06
#                  on an H100 alone in 7.3 min: seq - base CAS@10 +3.3, cas - iso +11.7 (RESULTS.md)
#   sharp          issue 20: a sharper teacher (train.teacher_temperature=0.5, CAS + isolated) on minutes and patients,
#                  seeds 0 and 1, spread questions, only the oracle and the composed rows (SHARP_METHODS=); paired
#                  with base as `seq` is (hypothesis: composed survival rises with the cartridge's standalone
#                  confidence, benchmarks.confidence_survival). Ran 2026-12-06 on an H100 (9 min): lost (oracle
#                  -2.1 / -5.0, pooled cas - iso at 10 from +4.6 to +1.0; RESULTS.md)
#   mixw2          issue 20: rows with distractors weigh twice in the loss (train.mixed_weight=2.0; CAS only) on
#                  minutes and patients, seeds 0 and 1, spread questions, the oracle and cas_composed rows; paired
#                  with base as `quiet` is (`compose_report --archive=<silent archive> --archive=<mixw2>`)
#   lever          issue 20: any compose_study variants (LEVER_VARIANTS=, required) on minutes and patients
#                  (LEVER_COLLECTIONS=), seeds 0 and 1, spread questions, paired with base as `quiet` is; e.g.
#                  LEVER_VARIANTS=k20: every document resident, rows with up to 19 distractors, as eval's 20 loaded
#                  (the issue's probe B = k_max = 20 lifted cas@10 from 39.2 to 46.7 on its collection A).
#                  LEVER_VARIANTS="k20 head32" ran 2026-12-06 on an H100 in 16.5 min: both lost (pooled cas - iso
#                  at 10: k20 +4.8, head32 +1.7, base +4.6; RESULTS.md)
#   compose_sal    issues 20 + 26: the salient init and the cosine lr decay against base on minutes and products
#                  (documents longer than p = 256), seeds 0 and 1, questions spread over each document
#                  (SAL_VARIANTS= / SAL_COLLECTIONS= pick fewer, e.g. base,salient on minutes)
#   silent         issue 20: silent rows (train.p_silent=0.25: distractors learn the prefix-free answer on
#                  conversations that are not theirs) against base on minutes and patients, seeds 0 and 1,
#                  questions spread over each document (the lever for distractor interference)
#   quiet          issue 20: quiet distractors (train.share_weight=1.0: the loss adds the share of each row's prefix
#                  attention that its distractor cartridges take) on minutes and patients, seeds 0 and 1, spread
#                  questions, CAS only: the silent study's recipe, so `compose_report --archive=<silent archive>
#                  --archive=<quiet> --base=base` pairs it with that study's base runs (same questions and
#                  distractors; its own self-study draw). Its rows carry the eval's distractor attention share; the
#                  silent study's base rows predate it: QUIET_VARIANTS=base,quiet runs base beside it (~2x the time)
#   gemma_minutes  issues 20 + 24: the compose study (CAS + isolated + icl_composed) with Gemma 3 270M
#   builtin6       issue 26 item 4 ("within 6 of ICL on the built-in collections, kept"): the paper preset's
#                  oracle and its untrained init on patients, products and minutes (the salient init: the
#                  documented choice for long running text), seeds 0 and 1, questions spread over each document
#                  (CAS training only; processes without preallocation; B6_KINDS= / B6_CONV= pick fewer
#                  collections / conversations per document: the preset's 512 make six self-study sets of
#                  10,240 conversations, ~20 min on an H200 side by side by the p512 study's 64-conversation speed).
#                  2026-12-06, H100, beside seq: patients at B6_CONV=256 took 15.4 min (self-study 553 s, training
#                  350 s): oracle -11.2 under ICL (RESULTS.md); minutes' self-study (2,048-token chunks) ran at ~4
#                  conversations/s beside seven processes and did not finish: run minutes alone or with B6_CONV=128.
#                  B6_EXTRA= adds flags to every run, B6_TAG= names its workdirs (<kind>_<tag>_s<seed>), e.g. the
#                  patients oracle's missing facts after the init window (RESULTS.md) at equal KV: two parts of a
#                  record, p = 256 each: B6_KINDS=patients B6_TAG=parts256 B6_EXTRA="--config.cartridge.max_doc_tokens=512
#                  --config.cartridge.num_tokens=256" (ran 2026-12-06, H100 alone, 6.7 min: lost, oracle 70.0 vs 80.0)
#   p512           issue 20: the compose study's base (CAS + isolated + icl_composed) at p = 512 on all three
#                  collections, seeds 0 and 1, questions spread over each document (on spread questions the
#                  p = 256 oracle is 21-27 under ICL, and CAS beat isolated by +17 only where the oracle was strong;
#                  P512_VARIANTS= / P512_COLLECTIONS= pick others: at init, p = 512, minutes wants the salient init
#                  (+20.2) and patients first_tokens (-10.4 salient), so `P512_VARIANTS=base,salient P512_ONLY=salient:minutes`;
#                  P512_MEM=0.065 fits those eight runs side by side on an H100)
#   long           issue 20: the budget the issue's probe pointed to (3,000 steps with p_isolated 0.1 lifted
#                  cas@10 by 11.6): base and iso01 (train.p_isolated=0.1) at 2,000 steps on patients and minutes,
#                  seeds 0 and 1, p = 256, spread questions (~23 min on an H100 alone; LONG_STEPS= changes it;
#                  LONG_VARIANTS=iso01f LONG_METHODS=cartridge_oracle,cas_composed,isolated_composed: the lever with
#                  its own isolated baseline at the same steps, two thirds of the trainings; ran 2026-12-06 on an
#                  H100 in 17.4 min: lost, pooled cas - iso at 10 +2.7 against base's +4.6, RESULTS.md)
#   p512rest       issue 20: the p = 512 base runs that failed on 2026-12-05 (patients seeds 0 and 1, products
#                  seed 0; OOM in the per-slot check, then a full disk; both fixed)
#   mono512        (seed 0 ran 2026-12-06 on an H100 in 7.3 min: MONO_SEEDS=1 for the second seed)
#                  issue 20 item 2: the monolithic baseline (one cartridge of N*(p-1)+1 tokens, the same KV as all N
#                  CAS cartridges) at p = 512 on all three collections, seeds 0 and 1, spread questions: the same
#                  questions as the p512 / p512rest archives, so `compose_report --archive=<p512> --archive=<p512rest>
#                  --archive=<mono512>` pairs it with CAS at all N loaded and with retrieval (~15 min on an H200;
#                  a monolithic p = 512 run gets 0.15 of an H200 (21 GB; preflight estimates ~10 GB), so an H100 runs three at a time: MONO_COLLECTIONS= /
#                  MONO_SEEDS= pick fewer, e.g. MONO_SEEDS=0 for one wave)
#   paper3         issue 20 items 2 + 4 at the paper preset's budget: CAS + isolated + icl_composed + the monolithic
#                  baseline at p = 512, 1,000 steps, PAPER3_CONV (default 128) conversations per document, on patients
#                  and products (where icl_composed reaches 5-10 documents), seeds 0 and 1, spread questions.
#                  Hypothesis: CAS composes about as the model reads the same documents as text, so with the
#                  oracle of the longer budget cas@n reaches icl_composed@n (p = 512 study: -7.9 / -3.3 at 5).
#                  ~20-25 min alone on an H200 (estimate from the p512 and budget studies). PAPER3_VARIANTS=base,seq:
#                  the preset's sequential positions (since 2026-12-06, from the p = 256 studies) against shared
#                  ones at its budget, CAS + isolated each; PAPER3_COLLECTIONS= picks others (minutes)
#   seqlast        issue 20: train.p_own_last=0.5 (half the mixed rows load their own cartridge next to the question)
#                  at the paper3 budget (p = 512, 1,000 steps, 128 conversations), CAS only + its retrieved rows, seed 0
#                  (SEQLAST_SEEDS=0,1), patients and products; pair with paper3's seq runs (2026-12-07 archive):
#                  compose_report --archive=<paper3> --archive=<seqlast> --base=seq. Hypothesis: recovers the 4.6
#                  points seq's CAS cartridge lost read alone and keeps its composed gain. SEQLAST_VARIANTS=seq,seqlast
#                  adds seq itself (e.g. for seed 1, which paper3 did not finish). Ran 2026-12-07 on an H100 with
#                  SEQLAST_COLLECTIONS=patients: 5.4 min alone (one training alone runs at ~11 steps/s; its first try ran
#                  out of memory at the 0.13 share and was resumed at 0.26 by the scheduler; since then the p = 512 jobs
#                  paper3, seqlast, late and parts give each run 0.1 of an H200, 14 GB); oracle +2.5 over seq,
#                  within noise, composed gain kept (RESULTS.md "Sequential positions"). 2026-12-07 (twenty-fourth
#                  session), SEQLAST_VARIANTS=seq,seqlast SEQLAST_SEEDS=1 SEQLAST_COLLECTIONS=patients,minutes: 13.1 min
#                  alone on an H100 (six trainings); seqlast lost (oracle +0.0 over seq pooled), seq's pooled
#                  cas - iso at 10 +10.4. Left for two seeds everywhere: products s1, minutes s0 (seq only)
#                  PAPER3_VARIANTS=seq,seqbare PAPER3_COLLECTIONS=minutes,patients PAPER3_ONLY=seq:minutes PAPER3_SEEDS=0:
#                  issue 26's bare question form (prompt_format=bare, variant seqbare) on both, seq's minutes s0 beside it
#                  (patients' seq s0 is in the paper3_seq archive)
#                  Ran 2026-12-07 (twenty-fifth session) as PAPER3_VARIANTS=seqbare PAPER3_COLLECTIONS=patients PAPER3_SEEDS=0
#                  with SEQLAST_VARIANTS=seqbare SEQLAST_SEEDS=1 SEQLAST_COLLECTIONS=minutes, SHARES="paper3=0.15 seqlast=0.15":
#                  8 min on an H200; the oracle +1.7 over seq pooled, within noise (RESULTS.md "The bare question form")
#                  Next (twenty-sixth session, not yet run: no device): SEQLAST_VARIANTS=seqbare SEQLAST_COLLECTIONS=products
#                  SEQLAST_SEEDS=0,1 (products' untrained bare init is -1.2 from ICL pooled, the template's -5.8, and the
#                  trained seq oracle sits at the template init) and PAPER3_VARIANTS=seq768b PAPER3_COLLECTIONS=patients
#                  PAPER3_SEEDS=0,1 (the window: patients' untrained p = 768 bare init is -3.2 from ICL at seed 0); both
#                  score their untrained init too (cartridge_init). Plan in the twenty-sixth closing note, checked with DRY=1
#                  Ran 2026-12-07 (twenty-seventh session) on an H100, SHARES="paper3=0.3 seqlast=0.2", 12.3 min: both lost,
#                  training pulls the oracle under its untrained init (-5.0 / -7.9) and buys composition (+11.2 at 10
#                  loaded on products; RESULTS.md "Training on a complete init"). Next: the blend of the two, at three
#                  alphas in one run (variants seqblend / blend768): SHARES="paper3=0.3 seqlast=0.2" PAPER3_VARIANTS=blend768
#                  PAPER3_COLLECTIONS=patients PAPER3_SEEDS=0,1 SEQLAST_VARIANTS=seqblend,blend300 SEQLAST_SEEDS=0,1
#                  SEQLAST_COLLECTIONS=products (fits an H100: CARD_MIB=81559 DRY=1 ... says so; blend300 is seqblend
#                  after 300 steps, on the same self-study); the same trainings as seqbare / seq768b, so
#                  compose_report --base=seqblend also pairs them with the archived runs. The anchor (train.anchor_weight,
#                  variants anch3 / anch30, on seqblend's self-study) can join seqlast: SEQLAST_VARIANTS=seqblend,anch3,anch30
#                  with SHARES="paper3=0.3 seqlast=0.25" (fits an H100; six products trainings, two at a time)
#   late           issues 26 + 20: self-study walks every sentence and quotes those after the first_tokens init's
#                  window three times per pass (variant late3, synth.late_weight=3) at the paper3 budget, shared
#                  positions, CAS + isolated, patients, seed 0 (products' documents end before token 511: late3 is
#                  the unweighted walk there; minutes: LATE_COLLECTIONS=minutes LATE_VARIANTS=base,late3, no paper3
#                  base run to pair with; RESULTS.md "How often the plan quotes the late facts") (LATE_SEEDS=, LATE_VARIANTS=walk,late3
#                  adds the unweighted walk; LATE_METHODS=no_context,icl,cartridge_oracle,cas_composed: CAS only, no
#                  isolated training); pair with paper3's base runs: compose_report --archive=<paper3>
#                  --archive=<late> --base=base. Hypothesis: the oracle's misses in the documents' last sections
#                  (patients' new medication 11 vs ICL's 19 of 20) shrink, the early facts, held by the init, stay.
#                  Ran 2026-12-07 on an H100 beside `parts` (12.4 min): lost, late facts 50.0 -> 52.5 (RESULTS.md)
#   parts          issues 26 + 20: minutes' meetings cut into parts of at most 1,024 tokens, one p = 512 cartridge each
#                  (variant parts1k, cartridge.max_doc_tokens=1024; 64 conversations per part: 66 parts at seed 0, 1.65x
#                  base's 128 per meeting in all), against base at paper3's budget (1,000 steps), CAS + isolated,
#                  seed 0 (PARTS_SEEDS=0,1). Hypothesis: minutes' facts after token 511 (40-48% vs ICL's 83-87, almost
#                  never quoted: RESULTS.md "How often the plan quotes the late facts") rise, since each part starts in
#                  its own init; compose_report --archive=<parts> --base=base (cas_composed@n counts meetings: a
#                  meeting loads all of its parts). Ran 2026-12-07 on an H100 (15 min, SHARES="late=0.17 parts=0.37"):
#                  oracle +11.7 at 3.3x the KV, late facts 38.3 -> 56.7 (RESULTS.md). Next (the finding that the
#                  trained oracle knows what its init read): PARTS_VARIANTS=parts1k,parts1k_sal PARTS_SEEDS=0,1
#                  PARTS_METHODS=no_context,icl,cartridge_oracle,cartridge_init,cas_composed,isolated_composed and
#                  compose_report --archive=<parts> --base=parts1k (prediction: 218 of minutes' 220 facts are in
#                  the parts' salient inits, against 112 in their first tokens: the oracle toward ICL's 92.5; untrained
#                  on the CPU, the salient parts are already at 90.0 vs ICL 92.5 over seeds 0 and 1, RESULTS.md)
#   gemma_paper    issue 24 item 3: the CAS `paper` preset with Gemma 3 270M (patients, seed 0, spread questions; CAS
#                  only: no_context, icl, oracle, cas_composed), its self-study at batch GP_BATCH (default 256) with
#                  refilled rows: at the preset's batch 64 it would take ~38 min (2026-12-05 rate), alone on an H200
#   q21            issue 21 item 3: retrieved cartridges vs text RAG on questions by content and pairs (ran
#                  2026-12-06 on an H100, 9.7 min; Q21_METHODS=cartridge_reranked adds the likelihood reranker,
#                  which lost with untrained cartridges and was never tried with trained ones; Q21_P=512 runs it at
#                  the paper preset's p: at p = 256 patients lost to text RAG, -5.0, where its oracle was weakest)
set -u
MODE=${1:-status}; R=${LEASE_ROOT:-/root/lease}
mkdir -p $R
CS="python3 benchmarks/compose_study.py"
# The jobs import ml_collections / bm25s from gpu_setup.sh's /tmp/site, which it puts on PYTHONPATH: a call that
# sources it inside a pipe (`. gpu_setup.sh | tail`) runs it in a subshell and loses the export, and every job then
# fails at once (2026-12-06: a whole study "finished" in seconds). Refuse to start instead.
need_setup() { [ -n "${DRY:-}" ] && return 0
  python3 -c "import ml_collections, bm25s" 2>/dev/null && return 0
  echo "lease.sh $MODE: ml_collections / bm25s are not importable: source benchmarks/gpu_setup.sh in this same call," \
       "not in a pipe (. benchmarks/gpu_setup.sh > /tmp/setup.log 2>&1; bash benchmarks/lease.sh ...)"; exit 2; }
run() { local name=$1; shift; if [ -n "${DRY:-}" ]; then echo "$name: $*"; return; fi  # DRY=1: print, start nothing
        setsid nohup "$@" > $R/$name.start.log 2>&1 < /dev/null & }
if [ "$MODE" = start ]; then
  need_setup
  # each job's share of an H200 (its processes' XLA_PYTHON_CLIENT_MEM_FRACTION at their peak), scaled to this card
  # (each process's fraction is above cas.train.preflight's estimate for its stage, which the run checks:
  # default model, CAS p = 256 / 512 about 5.5 / 6.8 GB, self-study with 2,048-token chunks 6.8 GB;
  # Gemma 3 270M, CAS p = 256 about 11.4 GB; an H200 has 143 GB)
  # prose jobs grow their processes (no preallocated fraction): their share is what four trainings
  # took at most on an H100 (2026-12-05: 0.1225 of 80 GB each was too little for a parts1k training)
  declare -A SHARE=([quiet]=0.25 [mixw2]=0.21 [lever]=0.25 [seq]=0.21 [sharp]=0.21 [silent]=0.25 [builtin6]=0.3 [prose_s2k]=0.35 [prose_cos]=0.35 [prose_sal]=0.35 [head32]=0.21 [compose_sal]=0.25 [gemma_minutes]=0.30 [q21]=0.15 [p512]=0.5 [long]=0.4 [p512rest]=0.25 [mono512]=0.5 [paper3]=0.9 [seqlast]=0.5 [late]=0.5 [parts]=0.5 [gemma_paper]=0.5)
  # (--disk_gb=5 on the p = 512 jobs of eight or six trainings: the auto reservation, 10 GB each, would hold back
  # some of them on the 64 GB disk; a finished p = 512 training keeps ~3 GB since 2026-12-05, and each training's
  # own preflight still refuses a disk that cannot hold it)
  # LEASE_EXTRA="--config.remat=none": more flags for every run of the compose-study jobs (their --extra), e.g. a
  # remat policy that `castep` measured faster (the same numbers up to rounding, so such runs still pair with
  # the archived base runs; say so beside the result)
  SPREAD="--config.eval.question_pick=spread${LEASE_EXTRA:+ $LEASE_EXTRA}"  # every compose job's --extra (+ its own)
  # SHARES="gemma_minutes=0.2 p512rest=0.31" overrides jobs' shares (and with them their schedulers' --mem_total)
  declare -A SET=(); for kv in ${SHARES:-}; do SHARE[${kv%%=*}]=${kv#*=}; SET[${kv%%=*}]=1; done
  # CARD_MIB=81559 DRY=1 ...: check a plan against an H100 from a machine without one
  GPU_MIB=${CARD_MIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)}
  SCALE=$(python3 -c "print(max(1.0, 143000 / float('${GPU_MIB:-143000}' or 143000)))")
  f() { python3 -c "print(f'{$1 * $SCALE:.3f}')"; }
  # mt: a compose job's total share (its scheduler's --mem_total), or 0.95 of the card when it is the only job
  # started: its runs then share the whole card instead of waiting for one another (2026-12-05, H100: the
  # silent job's lever runs waited behind its base runs at a 0.45 share; started by hand beside them, eight
  # runs took 73 of 80 GB and finished 8 minutes sooner)
  NJOBS=$(echo ${2:-prose_sal head32} | wc -w)
  mt() { if [ "$NJOBS" = 1 ] && [ -z "${SET[$j]:-}" ]; then echo 0.95; else f ${SHARE[$j]}; fi; }
  total=0; for j in ${2:-prose_sal head32}; do total=$(python3 -c "print($total + ${SHARE[$j]:-0} * $SCALE)"); done
  # one job alone takes the card (its scheduler's --mem_total is 0.95, mt above): no sum to check (2026-12-07: paper3's
  # H200 share, 0.9 x 1.79 on an H100, refused a job that fit)
  if [ "$NJOBS" != 1 ] && python3 -c "import sys; sys.exit(0 if $total > 0.97 else 1)"; then
    echo "start: these jobs need $(python3 -c "print(round($total, 2))") of this card's memory (${GPU_MIB} MiB; shares x $SCALE):" \
         "$(for j in ${2:-prose_sal head32}; do echo -n "$j $(python3 -c "print(round(${SHARE[$j]:-0} * $SCALE, 2))") "; done)- start fewer (their sum <= 0.97)" \
         "or shrink them in proportion: SHARES=\"$(for j in ${2:-prose_sal head32}; do echo -n "$j=$(python3 -c "print(f'{${SHARE[$j]:-0} * 0.95 / $total:.3f}')") "; done | sed 's/ $//')\""
    exit 2
  fi
  for j in ${2:-prose_sal head32}; do
    case $j in
      prose_s2k|prose_cos|prose_sal)
        case $j in prose_s2k) pv="walk64s2k_parts1k walkq64_parts1k";; prose_cos) pv="walk64cos_parts1k walkq64_parts1k";;
                   *) pv="walk64sal_parts1k walk64cos_parts1k";; esac
        for s in 0 1; do
          SEED=$s SYNTH_MEM=grow MEM=grow CONV=64 VARIANTS="${PROSE_VARIANTS:-$pv}" run prose_s$s \
            bash benchmarks/prose_sweep.sh start $R/prose_s$s
        done;;
      head32) run head32 $CS start $R/head32 --variants=${HEAD32_VARIANTS:-base,head32} --collections=patients,minutes --seeds=0,1 \
                ${HEAD32_METHODS:+--methods=$HEAD32_METHODS} \
                --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      compose_sal) run compose_sal $CS start $R/compose_sal --variants=${SAL_VARIANTS:-base,salient,cosine} --collections=${SAL_COLLECTIONS:-minutes,products} \
                --seeds=0,1 --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      sharp) run sharp $CS start $R/sharp --variants=${SHARP_VARIANTS:-sharp} --collections=${SHARP_COLLECTIONS:-minutes,patients} \
                --seeds=0,1 --methods=${SHARP_METHODS:-cartridge_oracle,cas_composed,isolated_composed} --mem=$(f 0.06) \
                --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      seq) run seq $CS start $R/seq --variants=${SEQ_VARIANTS:-seq} --collections=${SEQ_COLLECTIONS:-minutes,patients} \
                --seeds=0,1 --methods=${SEQ_METHODS:-cartridge_oracle,cas_composed,isolated_composed} --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      lever) : ${LEVER_VARIANTS:?LEVER_VARIANTS= names the compose_study variants}  # "k20 head32" or k20,head32
             run lever $CS start $R/lever --variants=${LEVER_VARIANTS// /,} \
                --collections=${LEVER_COLLECTIONS:-minutes,patients} --seeds=0,1 ${LEVER_METHODS:+--methods=$LEVER_METHODS} \
                --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      mixw2) run mixw2 $CS start $R/mixw2 --variants=mixw2 --collections=${MIXW2_COLLECTIONS:-minutes,patients} --seeds=0,1 \
                --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      quiet) run quiet $CS start $R/quiet --variants=${QUIET_VARIANTS:-quiet} --collections=${QUIET_COLLECTIONS:-minutes,patients} \
                --seeds=0,1 --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      silent) run silent $CS start $R/silent --variants=base,silent --collections=minutes,patients \
                --seeds=0,1 --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      p512) run p512 $CS start $R/p512 --variants=${P512_VARIANTS:-base} --collections=${P512_COLLECTIONS:-patients,products,minutes} --seeds=0,1 --p=512 \
                --only=${P512_ONLY:-} --mem=$(f ${P512_MEM:-0.075}) --synth_mem=$(f 0.06) --mem_total=$(mt) "--extra=$SPREAD";;
      long) run long $CS start $R/long --variants=${LONG_VARIANTS:-base,iso01} --collections=patients,minutes --seeds=0,1 \
                ${LONG_METHODS:+--methods=$LONG_METHODS} --steps=${LONG_STEPS:-2000} --mem=$(f 0.06) --synth_mem=$(f 0.06) --mem_total=$(mt) \
                "--extra=$SPREAD";;
      p512rest) run p512rest $CS start $R/p512rest --variants=base --collections=patients,products --seeds=0,1 --p=512 \
                --only=base:patients+products --mem=$(f 0.075) --synth_mem=$(f 0.06) --mem_total=$(mt) \
                "--extra=$SPREAD";;
      mono512) run mono512 $CS start $R/mono512 --variants=mono --collections=${MONO_COLLECTIONS:-patients,products,minutes} \
                --seeds=${MONO_SEEDS:-0,1} --mono_seeds=${MONO_SEEDS:-0,1} --p=512 --mem=$(f 0.075) --synth_mem=$(f 0.06) --mem_total=$(mt) --disk_gb=5 \
                "--extra=$SPREAD";;
      paper3) run paper3 $CS start $R/paper3 --variants=${PAPER3_VARIANTS:-base,mono} --collections=${PAPER3_COLLECTIONS:-patients,products} --seeds=${PAPER3_SEEDS:-0,1} \
                --only=${PAPER3_ONLY:-} \
                --mono_seeds=0,1 --p=512 --steps=1000 --conv=${PAPER3_CONV:-128} --mem=$(f 0.1) --synth_mem=$(f 0.06) \
                --mem_total=$(mt) --disk_gb=5 "--extra=$SPREAD";;
      seqlast) run seqlast $CS start $R/seqlast --variants=${SEQLAST_VARIANTS:-seqlast} --collections=${SEQLAST_COLLECTIONS:-patients,products} \
                --seeds=${SEQLAST_SEEDS:-0} --p=512 --steps=1000 --conv=128 --mem=$(f 0.1) --synth_mem=$(f 0.06) \
                --mem_total=$(mt) --disk_gb=5 "--extra=$SPREAD";;
      late) run late $CS start $R/late --variants=${LATE_VARIANTS:-late3} --collections=${LATE_COLLECTIONS:-patients} \
                --seeds=${LATE_SEEDS:-0} --p=512 --steps=1000 --conv=128 --mem=$(f 0.1) --synth_mem=$(f 0.06) \
                ${LATE_METHODS:+--methods=$LATE_METHODS} --mem_total=$(mt) --disk_gb=5 "--extra=$SPREAD";;
      parts) run parts $CS start $R/parts --variants=${PARTS_VARIANTS:-base,parts1k} --collections=${PARTS_COLLECTIONS:-minutes} \
                --seeds=${PARTS_SEEDS:-0} --p=512 --steps=1000 --conv=128 --mem=$(f 0.1) --synth_mem=$(f 0.06) \
                --methods=${PARTS_METHODS:-no_context,icl,cartridge_oracle,cas_composed,isolated_composed} \
                --mem_total=$(mt) --disk_gb=5 "--extra=$SPREAD";;
      gemma_paper) mkdir -p $R/gemma_paper; XLA_PYTHON_CLIENT_PREALLOCATE=false run gemma_paper python3 -m launch.cas \
                --config=configs/cas.py:paper --config.model_path=gemma3-270m --config.synth.batch_size=${GP_BATCH:-256} \
                --config.synth.shard_size=$((2 * ${GP_BATCH:-256})) --config.synth.refill=True --config.layer_loop=scan \
                "--config.eval.methods=('no_context','icl','cartridge_oracle','cas_composed')" --config.eval.question_pick=spread \
                --stages=synth,train,indexes,evaluate --workdir=$R/gemma_paper;;
      gemma_minutes) run gemma $CS start $R/gemma --variants=base --collections=minutes --seeds=0,1 --mem=$(f 0.1) \
                --mem_total=$(mt) --methods=no_context,icl,cartridge_oracle,cas_composed,isolated_composed,icl_composed \
                "--extra=--config.model_path=gemma3-270m --config.eval.num_loaded=(1,2,5,10) $SPREAD";;
      builtin6) for k in ${B6_KINDS:-patients products minutes}; do for s in 0 1; do
                  w=${k}${B6_TAG:+_$B6_TAG}_s$s; mkdir -p $R/builtin6/$w
                  XLA_PYTHON_CLIENT_PREALLOCATE=false run builtin6_$w python3 -m launch.cas \
                    --config=configs/cas.py:paper --config.data.kind=$k --config.data.seed=$s --config.synth.seed=$s \
                    --config.train.seed=$s --config.eval.question_pick=spread \
                    --config.synth.conversations=${B6_CONV:-512} $([ $k = minutes ] && echo --config.cartridge.init_text=salient) --config.layer_loop=scan \
                    "--config.eval.methods=('no_context','icl','cartridge_oracle','cartridge_init')" \
                    ${B6_EXTRA:-} --stages=synth,train,indexes,evaluate --workdir=$R/builtin6/$w; done; done;;
      q21) run q21 $CS start $R/q21 --variants=base --collections=patients,products,minutes --seeds=0,1 --p=${Q21_P:-256} \
                --mem=$(f 0.05) --synth_mem=$(f 0.06) --mem_total=$(mt) \
                --methods=no_context,icl,cartridge_oracle,cartridge_retrieved,cartridge_adaptive,rag_text,cartridge_gold_pair${Q21_METHODS:+,$Q21_METHODS} \
                "--extra=--config.data.question_refs=title,content --config.data.pair_share=0.25 --config.eval.retrieval_k=(1,2,4,8) $SPREAD";;
      *) echo "unknown job $j"; exit 2;;
    esac
  done
  [ -n "${DRY:-}" ] && exit 0
  sleep 10; ls $R; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
elif [ "$MODE" = then ]; then
  # bash benchmarks/lease.sh then "<running jobs>" "<jobs to start>": a detached watcher starts the second set (as
  # `start` would, with this call's environment) once every run of the first set has ended, so the card does not
  # idle until the next call notices (2026-12-06: sharp's runs ended ~100 s before the call that saw them)
  # (checked now, not when the watcher starts them: 2026-12-07 a `then` from a call without gpu_setup.sh waited
  # 12 minutes and then could not start parts1k_sal)
  need_setup
  setsid nohup bash "$0" _then "$2" "$3" > $R/then.log 2>&1 < /dev/null &
  echo "then: '$3' starts when '$2' has ended (log: $R/then.log)"
elif [ "$MODE" = _then ]; then
  waited=0
  while true; do
    busy=0
    for j in $2; do
      python3 -c "import json, sys; s = json.load(open(sys.argv[1]))['state']; \
sys.exit(1 if any(str(v).startswith(('running', 'waiting')) for v in s.values()) else 0)" $R/$j/status.json \
        2> /dev/null || busy=1
    done
    [ $busy = 0 ] && break
    if [ $waited -ge ${THEN_TIMEOUT_S:-3600} ]; then echo "then: '$2' still running after ${waited}s; '$3' not started"; exit 1; fi
    sleep ${THEN_POLL_S:-15}; waited=$((waited + ${THEN_POLL_S:-15}))
  done
  echo "then: '$2' ended after ${waited}s; starting '$3'"
  exec bash "$0" start "$3"
elif [ "$MODE" = decode ]; then
  if pgrep -f "launch.[c]as" > /dev/null; then echo "decode: training jobs are running; timings would be shared"; exit 2; fi
  [ "${SELFSTUDY:-1}" = 1 ] && need_setup  # the self-study half runs launch.synthesize
  bash benchmarks/decode_levers.sh
elif [ "$MODE" = castep ]; then
  # the CAS step of the composition study's shape (the default model's shape, random weights: p = 256, 10 slots,
  # k_max = 10, batch 16 x 512) under each remat policy (REMATS=, default "full none dots"): the paper preset
  # trains with remat full; a faster step makes every study cheaper, if its transient memory (temp_bytes) still
  # lets four to eight trainings share the card. Alone on the GPU, like decode; JSON lines in $OUT/cas_step.jsonl
  if pgrep -f "launch.[c]as" > /dev/null; then echo "castep: training jobs are running; timings would be shared"; exit 2; fi
  for r in ${REMATS:-full none dots}; do
    python3 -m benchmarks.cas_step --model=${CASTEP_MODEL:-smollm2-135m} --p=${CASTEP_P:-256} --slots=10 --k_max=10 \
      --batch=16 --seq=512 --attn=auto --remat=$r --nobreakdown --nosingle_same_prefix --out=$OUT/cas_step.jsonl 2>&1 \
      | grep -a '"status"' | cut -c1-300
  done
elif [ "$MODE" = status ]; then
  for f in $R/*/status.json; do [ -f "$f" ] && echo "== $f" && python3 -c "import json,sys; d=json.load(open('$f')); print(d['elapsed_s'], 's', {k: v for k, v in d['state'].items()})"; done
  for d in $R/prose_s*; do [ -d "$d" ] && echo "== $d" && for l in $d/*.log; do echo "$(basename $l): $(tr '\r' '\n' < $l | grep -a -E 'it/s|step|conv' | tail -n 1 | cut -c1-120)"; done; done
  for l in $R/builtin6_*.start.log $R/gemma_paper.start.log; do [ -f "$l" ] && echo "$(basename $l): $(tr '\r' '\n' < $l | grep -a -E 'it/s|step|conv|Error' | tail -n 1 | cut -c1-120)"; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  # with $OUT set (a device call), every status also collects what has finished: a machine taken back mid-run
  # keeps what an earlier call brought back (2026-12-06: a k20/head32 study lost whole). COLLECT=0: status only
  if [ -n "${OUT:-}" ] && [ "${COLLECT:-1}" = 1 ]; then bash "$0" collect > /dev/null 2>&1; echo "(collected into $OUT)"; fi
else
  for j in sharp seq mixw2 lever quiet head32 compose_sal silent gemma q21 p512 long p512rest mono512 paper3 seqlast late parts; do [ -d $R/$j ] && mkdir -p $OUT/$j && $CS wait $R/$j --timeout=0 > /dev/null 2>&1; \
    [ -f $OUT/compose_study.tgz ] && mv $OUT/compose_study.tgz $OUT/$j/; done
  [ -d $R/gemma_paper ] && mkdir -p $OUT/gemma_paper && (cd $R && tar czf $OUT/gemma_paper/gemma_paper.tgz gemma_paper.start.log \
    gemma_paper/eval/results.json gemma_paper/eval/partial 2>/dev/null)
  [ -d $R/builtin6 ] && mkdir -p $OUT/builtin6 && (cd $R && tar czf $OUT/builtin6/builtin6.tgz builtin6_*.start.log \
    builtin6/*/eval/results.json builtin6/*/parts*/eval/results.json 2>/dev/null)
  for s in 0 1; do [ -d $R/prose_s$s ] && mkdir -p $OUT/prose_s$s && \
    (cd $R/prose_s$s && tar czf $OUT/prose_s$s/prose_sweep.tgz *.log */eval/results.json */parts*/eval/results.json 2>/dev/null); done
  ls -R $OUT | head -20
fi
