#!/usr/bin/env bash
# Proves that a sweep runs as a real SLURM job array: installs Debian's slurm-wlm and munge (as
# root) if missing, starts a one-node cluster on this machine, submits the 4 trials of a copy of
# configs/sweep-smoke.toml as `sbatch --array=0-3`, one `st-tune sweep run --trial
# $SLURM_ARRAY_TASK_ID` per task, waits, and checks with `st-tune sweep report --json` that every
# trial is complete and that each ran in its own array task. Stops the cluster at the end.
# Needs the MiniLM weights (scripts/fetch-weights.sh --minilm-only).
#   scripts/slurm-sweep.sh [WORK_DIR]     # default: a temporary folder, removed on success
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/st-tune-slurm.XXXXXX")}
mkdir -p "$work"
work=$(cd "$work" && pwd)

if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  [[ $(id -u) == 0 ]] || { echo "slurm-sweep.sh: slurm-wlm and munge are missing; run as root to install them" >&2; exit 2; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge > /dev/null
fi
cargo build --quiet
bin=$repo/target/debug/st-tune

# munge: the key, then the daemon (it refuses to run as root).
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged > /dev/null || runuser -u munge -- /usr/sbin/munged

# A one-node cluster: this host, its CPUs and memory as slurmd measures them.
host=$(hostname)
node=$(slurmd -C | head -n 1)
mkdir -p /etc/slurm /var/lib/slurm/slurmd /var/lib/slurm/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=st-tune-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
stop() { scontrol shutdown > /dev/null 2>&1 || true; }
trap stop EXIT
pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
for _ in $(seq 60); do
  sinfo -h -o '%t' 2> /dev/null | grep -qE '^(idle|mix|alloc)' && break
  sleep 1
done
sinfo

# The smoke sweep, its folder in WORK_DIR.
cat > "$work/sweep.toml" <<TOML
[sweep]
base = "$repo/configs/ci-smoke.toml"
dir = "$work/sweep"
method = "grid"
metric = "dev.spearman"
[space]
"train.lr" = [2e-5, 1e-4]
"train.batch_size" = [4, 8]
TOML
trials=$("$bin" sweep list "$work/sweep.toml" --json | wc -l)
echo "submitting $trials trials as a job array"
sbatch --wait --array=0-$((trials - 1)) --cpus-per-task=1 --chdir="$repo" \
  --output="$work/slurm-%A_%a.out" \
  --wrap "RAYON_NUM_THREADS=1 $bin sweep run $work/sweep.toml --trial \$SLURM_ARRAY_TASK_ID --json"

"$bin" sweep report "$work/sweep.toml"
python3 - "$work" "$trials" <<'PY'
import glob, json, subprocess, sys
work, trials = sys.argv[1], int(sys.argv[2])
report = json.loads(subprocess.check_output(
    ["target/debug/st-tune", "sweep", "report", f"{work}/sweep.toml", "--json"]))
statuses = {t["index"]: t["status"] for t in report["trials"]}
assert statuses == {i: "complete" for i in range(trials)}, statuses
outs = sorted(glob.glob(f"{work}/slurm-*_*.out"))
ran = sorted(json.loads(open(o).read().splitlines()[-1])["index"] for o in outs)
assert ran == list(range(trials)), (outs, ran)
print(f"slurm-sweep: ok: {trials} array tasks, one trial each, all complete; "
      f"best trial {report['best']['index']} ({report['metric']} {report['best']['metric']:.4f})")
PY
rm -rf "$work"
