# Grammar of one dmsetup table entry (one logical line):
#
#   <start> <length> <target_type> [<arg> ...]
#
# Compiled by `npm run grammar` into table-grammar.cjs; used by table-parse.ts.
#
# Token-level: the lexer is TableLexer in table-parse.ts, handed to the nearley Parser
# through its `lexer` option. Before it, table-parse.ts joins continuation lines and strips
# comments; the lexer splits on blanks and removes escapes. It emits two token types:
#
#   uint  a decimal non-negative integer no greater than Number.MAX_SAFE_INTEGER;
#         `number` holds its value
#   word  any other argument
#
# The rule names start_sector, length and target_type matter: when nearley stops,
# table-parse.ts reads which of them was waiting for a token and names it in the error
# ("invalid length '-5' …", "missing target type"). Rename them there too.

@{%
// Token specs, matched against the `type` of TableLexer's tokens.
const uint = { type: 'uint' };
const word = { type: 'word' };
%}

entry       -> start_sector length target_type args
               {% ([start, length, type, args]) => ({ start, length, type, args }) %}

start_sector -> %uint                 {% ([t]) => t.number %}
length       -> %uint                 {% ([t]) => t.number %}

# Any word: whether a type of that name exists is the table loader's question.
target_type  -> %word                 {% ([t]) => t.value %}
              | %uint                 {% ([t]) => t.value %}

args         -> arg:*                 {% ([list]) => list %}
arg          -> %word                 {% ([t]) => t.value %}
              | %uint                 {% ([t]) => t.value %}
