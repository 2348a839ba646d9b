# Settings checks shared by benchmarks/length_limits.sh and
# benchmarks/throughput_at_length.sh: sourced (not run) after the caller sets
# settings_script to its own name and before it runs anything. Each check
# prints "<settings_script>: <what is wrong>" on stderr and exits 2.
#   require_positive_integer VAR...         each variable holds one positive integer
#   require_positive_integers VAR WHAT      every word of VAR is one (WHAT: what they count)
#   require_recompute_modes VAR             every word of VAR is NONE, BLOCK or SELECTIVE
#   require_file VAR                        VAR names an existing file
#   require_files VAR                       every word of VAR names an existing file
#   require_token_file PATH                 the token file exists
#   require_loom_train BUILD                BUILD/launch/loom-train is built

settings_fail() {
  echo "${settings_script:-benchmark}: $*" >&2
  exit 2
}

require_positive_integer() {
  local var
  for var; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || settings_fail "$var = '${!var}': give a positive integer"
  done
}

require_positive_integers() {
  local var=$1 what=$2 word
  for word in ${!var}; do
    [[ $word =~ ^[1-9][0-9]*$ ]] || settings_fail "$var holds '$word': give positive integers ($what)"
  done
}

require_recompute_modes() {
  local var=$1 word
  for word in ${!var}; do
    [[ $word =~ ^(NONE|BLOCK|SELECTIVE)$ ]] || settings_fail "$var holds '$word': give NONE, BLOCK or SELECTIVE"
  done
}

require_file() {
  local var=$1
  [[ -f ${!var} ]] || settings_fail "$var = '${!var}' is not a file"
}

require_files() {
  local var=$1 word
  for word in ${!var}; do
    [[ -f $word ]] || settings_fail "$var holds '$word', which is not a file"
  done
}

require_token_file() {
  [[ -f $1 ]] || settings_fail "no token file $1 (bash launch/run-demo.sh prepares it)"
}

require_loom_train() {
  [[ -x $1/launch/loom-train ]] || settings_fail "no $1/launch/loom-train (build it first)"
}
