#!/bin/sh
# Makes a cluster CA and certificates signed by it (EC P-256, valid one year):
#   make-cluster-certs.sh DIR coordinator:coord-1 node:node-1 submitter:ci-client operator:alice
# Each ROLE:NAME makes NAME.pem and NAME.key. The role is a subjectAltName URI
# (solstice:role/node, solstice:role/submitter, solstice:role/operator; the
# coordinator's own is solstice:role/coordinator) and NAME the subject's CN:
#   node       joins the coordinator and runs jobs; its node name is NAME
#   submitter  submits jobs, and sees, follows and cancels its own only
#   operator   sees, follows and cancels every job (and may submit)
# Keep DIR/cluster-ca.key offline; copy cluster-ca.pem plus one NAME.pem/NAME.key
# pair to each machine. Peers are checked against the CA only (no host names).
set -eu
if [ $# -lt 2 ]; then
	echo "usage: $0 DIR ROLE:NAME... (ROLE: coordinator, node, submitter or operator)" >&2
	exit 2
fi
dir=$1
shift
for spec in "$@"; do
	case "$spec" in
	coordinator:?* | node:?* | submitter:?* | operator:?*) ;;
	*)
		echo "$0: '$spec': expected ROLE:NAME with ROLE coordinator, node, submitter or operator" >&2
		exit 2
		;;
	esac
done
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/cluster-ca.pem" ]; then
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$dir/cluster-ca.key" -out "$dir/cluster-ca.pem" -days 3650 \
		-subj "/CN=solstice-runner cluster CA"
fi
for spec in "$@"; do
	role=${spec%%:*}
	name=${spec#*:}
	printf 'subjectAltName=URI:solstice:role/%s\n' "$role" >"$dir/$name.ext"
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name"
	openssl x509 -req -in "$dir/$name.csr" -CA "$dir/cluster-ca.pem" \
		-CAkey "$dir/cluster-ca.key" -CAcreateserial -out "$dir/$name.pem" -days 365 \
		-extfile "$dir/$name.ext"
	rm -f "$dir/$name.csr" "$dir/$name.ext"
done
