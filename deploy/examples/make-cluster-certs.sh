#!/bin/sh
# Makes a cluster CA and certificates signed by it (EC P-256, valid one year):
#   make-cluster-certs.sh DIR coordinator node-1 node-2 ci-client ...
# Keep DIR/cluster-ca.key offline; copy cluster-ca.pem plus one NAME.pem/NAME.key
# pair to each machine. Peers are checked against the CA only (no host names).
set -eu
if [ $# -lt 2 ]; then
	echo "usage: $0 DIR NAME..." >&2
	exit 2
fi
dir=$1
shift
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/cluster-ca.pem" ]; then
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$dir/cluster-ca.key" -out "$dir/cluster-ca.pem" -days 3650 \
		-subj "/CN=solstice-runner cluster CA"
fi
for name in "$@"; do
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name"
	openssl x509 -req -in "$dir/$name.csr" -CA "$dir/cluster-ca.pem" \
		-CAkey "$dir/cluster-ca.key" -CAcreateserial -out "$dir/$name.pem" -days 365
	rm -f "$dir/$name.csr"
done
