#!/usr/bin/env bash
# The hospital scenario end to end on this machine (127.0.0.1): five hospitals train a ResNet-18 on their own
# chest X-ray folders without sharing them; TLS with client certificates, signed clients, secure aggregation
# and central DP; then each hospital's accuracy on its own test folder and the worst one.
# Exactly the commands of examples/hospitals/README.md. Settings come from the environment:
#
#   ROUNDS=15 SCALE=1 DP_CLIP=1.0 DP_NOISE=0.001 examples/hospitals/run.sh   (the defaults; DP_CLIP=0: no DP)
#   SECAGG=0       plain FedAvg instead of secure aggregation
#   WORK=DIR       where data, keys, client state and outputs go (default examples/hospitals/run)
#   DATA=DIR       use these hospital folders instead of generating them (DATA/hospital_1 ... and DATA/reference)
#   INSITU=CMD     the insitu command (default: insitu); PYTHON=CMD the interpreter (default: python3)
#   TENSORBOARD=DIR  the server also logs each round's metrics there (pip install 'insitu[tensorboard]')
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
INSITU=${INSITU:-insitu}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$HERE/run}
ROUNDS=${ROUNDS:-15}
SCALE=${SCALE:-1}
IMAGE_SIZE=${IMAGE_SIZE:-64}
MODEL=${MODEL:-resnet18-w16}  # ResNet-18 at 16 channels wide (CPU); resnet18 is the full 64-wide one
LR=${LR:-0.02}
LR_SCHEDULE=${LR_SCHEDULE:-cosine}   # decays to 0 by the last round: the model settles
MOMENTUM=${MOMENTUM:-0.9}
BATCH_SIZE=${BATCH_SIZE:-32}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-2}
DP_CLIP=${DP_CLIP:-1.0}
DP_NOISE=${DP_NOISE:-0.001}
SECAGG=${SECAGG:-1}
NORMALIZE=${NORMALIZE:-0.4/0.23}   # the same on every party (auto would use each hospital's own statistics)
HOSPITALS=(hospital_1 hospital_2 hospital_3 hospital_4 hospital_5)
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
ADDRESS=127.0.0.1:$PORT

mkdir -p "$WORK"
if [[ -z "${DATA:-}" ]]; then  # 1. the data: each hospital's folder (in real life, already on its own machine)
  DATA=$WORK/data
  [[ -d $DATA ]] || "$PYTHON" "$HERE/make_data.py" --out "$DATA" --scale "$SCALE"
fi

# 2. keys: a CA, the server's TLS certificate, one certificate + Ed25519 signing key per hospital, the allow-list
ids=()
for h in "${HOSPITALS[@]}"; do ids+=(--client-id "$h"); done
"$INSITU" keygen --out "$WORK/fed" "${ids[@]}" --overwrite > "$WORK/keygen.log"

# 3. the server: TLS + client certificates (--certs), secure aggregation, central DP; it evaluates on a public
#    reference set (DATA/reference) and asks every hospital to evaluate on its own test folder each round
privacy=()
[[ $SECAGG == 1 ]] && privacy+=(--secure-aggregation)
[[ $DP_CLIP != 0 ]] && privacy+=(--dp-clip "$DP_CLIP" --dp-noise "$DP_NOISE" --dp-record-client-metrics)
[[ -n ${TENSORBOARD:-} ]] && privacy+=(--tensorboard "$TENSORBOARD")
image=(--image-size "$IMAGE_SIZE" --image-mode grayscale --normalize "$NORMALIZE")
"$INSITU" server --certs "$WORK/fed" --address "$ADDRESS" --data "$DATA/reference" "${image[@]}" \
  --model "$MODEL" --min-clients ${#HOSPITALS[@]} --rounds "$ROUNDS" --fraction-evaluate 1 \
  --local-epochs "$LOCAL_EPOCHS" --batch-size "$BATCH_SIZE" --lr "$LR" --lr-schedule "$LR_SCHEDULE" --momentum "$MOMENTUM" \
  "${privacy[@]}" --output-dir "$WORK/server" --quiet > "$WORK/server.log" 2>&1 &
server=$!
trap 'kill $server ${clients[*]:-} 2>/dev/null || true' EXIT

# 4. one client per hospital, each with only its own folder (train/ and test/), one torch thread each
clients=()
for h in "${HOSPITALS[@]}"; do
  OMP_NUM_THREADS=1 "$INSITU" client --certs "$WORK/fed/clients/$h" --client-id "$h" --address "$ADDRESS" \
    --data "$DATA/$h" "${image[@]}" --state-dir "$WORK/state/$h" --quiet > "$WORK/$h.log" 2>&1 &
  clients+=($!)
done

status=0
wait "$server" || status=$?
for pid in "${clients[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
if [[ $status != 0 ]]; then
  echo "the run failed (exit $status): see $WORK/server.log and $WORK/hospital_*.log" >&2
  tail -n 20 "$WORK/server.log" >&2
  exit "$status"
fi

# 5. per-hospital and worst-hospital accuracy, from the server's history.json
"$PYTHON" "$HERE/report.py" "$WORK/server/history.json" --json "$WORK/summary.json"
