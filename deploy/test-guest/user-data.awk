# Prints the #cloud-config document contained in a NoCloud user-data file: the
# file itself when it starts with #cloud-config, or the first MIME part whose body
# is a #cloud-config (base64 parts are printed with a "#base64" first line so the
# caller can decode them). Busybox awk compatible.

{ sub(/\r$/, "") }

NR == 1 && /^#cloud-config/ { plain = 1 }
plain { print; next }

# MIME multipart: learn the boundary from the headers.
boundary == "" && tolower($0) ~ /boundary=/ {
	b = $0; sub(/.*[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]=/, "", b); sub(/;.*/, "", b)
	gsub(/"/, "", b); boundary = b; next
}
boundary == "" { next }

$0 == "--" boundary || $0 == "--" boundary "--" {
	if (printing) { done = 1 }
	in_headers = 1; base64 = 0; body_first = 1; next
}
done { next }
in_headers {
	if ($0 == "") { in_headers = 0; next }
	if (tolower($0) ~ /^content-transfer-encoding:[ \t]*base64/) base64 = 1
	next
}
body_first {
	body_first = 0
	if (base64) { printing = 1; print "#base64"; print; next }
	if ($0 ~ /^#cloud-config/) { printing = 1; print; next }
	next
}
printing { print }
