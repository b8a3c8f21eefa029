# Reads a NoCloud #cloud-config document (already cut out of any MIME
# multipart) and writes what the test guest needs into the directory `out`:
#   out/user             the first user's name (users: list, entry with name:)
#   out/authorized_keys  that user's ssh_authorized_keys, plus any top-level ones
#   out/host_ed25519     ssh_keys: ed25519_private block, indentation removed
#   out/host_ed25519.pub ssh_keys: ed25519_public
# Only the block-style YAML layout that cloud-init examples (and the runner) use is
# understood; indentation widths may vary. Busybox awk compatible.

function indent_of(line) { match(line, /^ */); return RLENGTH }
function unquote(v) {
	sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
	if (v ~ /^".*"$/ || v ~ /^'.*'$/) v = substr(v, 2, length(v) - 2)
	return v
}
function value_after_colon(line,   v) {
	v = line; sub(/^[^:]*:/, "", v); return unquote(v)
}

BEGIN {
	section = ""; user = ""; user_dash_indent = -1; in_first_user = 0
	keys_indent = -1; block_key_indent = -1; block_indent = -1
}

{ sub(/\r$/, "") }

# Inside the `ed25519_private: |` literal block: every line indented deeper than the
# key belongs to it (blank lines too, unless trailing); the first line fixes the
# indentation to strip.
block_key_indent >= 0 {
	if ($0 ~ /^[ \t]*$/) { pending_blank_lines++; next }
	ind = indent_of($0)
	if (ind > block_key_indent) {
		if (block_indent < 0) block_indent = ind
		for (; pending_blank_lines > 0; pending_blank_lines--) print "" > (out "/host_ed25519")
		print substr($0, block_indent + 1) > (out "/host_ed25519")
		next
	}
	block_key_indent = -1; pending_blank_lines = 0
}

/^[ \t]*#/ || /^[ \t]*$/ { next }

# A top-level key starts a new section.
/^[A-Za-z_][A-Za-z0-9_-]*:/ {
	section = $0; sub(/:.*/, "", section)
	keys_indent = -1
	if (section == "ssh_authorized_keys") keys_indent = 0
	next
}

{ ind = indent_of($0); line = substr($0, ind + 1) }

# List items of an ssh_authorized_keys list being read. YAML allows the dashes at
# the same indentation as the key itself.
keys_indent >= 0 {
	if (line ~ /^- / && ind >= keys_indent) {
		key = unquote(substr(line, 3))
		if (key != "") print key > (out "/authorized_keys")
		next
	}
	keys_indent = -1
}

section == "users" {
	if (line ~ /^- /) {
		# A new list entry: the first one carrying a name is the user we make.
		if (in_first_user && ind <= user_dash_indent) in_first_user = 0
		rest = substr(line, 3); sub(/^ +/, "", rest)
		if (user == "" && rest ~ /^name:/) {
			user = value_after_colon(rest); in_first_user = 1; user_dash_indent = ind
			print user > (out "/user")
		}
		next
	}
	if (user == "" && line ~ /^name:/) {
		user = value_after_colon(line); in_first_user = 1; user_dash_indent = ind - 2
		print user > (out "/user")
		next
	}
	if (in_first_user && line ~ /^ssh_authorized_keys:[ \t]*$/) { keys_indent = ind; next }
	next
}

section == "ssh_keys" {
	if (line ~ /^ed25519_private:[ \t]*[|>]/) { block_key_indent = ind; block_indent = -1; pending_blank_lines = 0; next }
	if (line ~ /^ed25519_public:/) { print value_after_colon(line) > (out "/host_ed25519.pub"); next }
	next
}
