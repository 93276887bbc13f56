// Generated automatically by nearley, version 2.20.1
// http://github.com/Hardmath123/nearley
(function () {
function id(x) { return x[0]; }

// Token specs, matched against the `type` of TableLexer's tokens.
const uint = { type: 'uint' };
const word = { type: 'word' };
var grammar = {
    Lexer: undefined,
    ParserRules: [
    {"name": "entry", "symbols": ["start_sector", "length", "target_type", "args"], "postprocess": ([start, length, type, args]) => ({ start, length, type, args })},
    {"name": "start_sector", "symbols": [uint], "postprocess": ([t]) => t.number},
    {"name": "length", "symbols": [uint], "postprocess": ([t]) => t.number},
    {"name": "target_type", "symbols": [word], "postprocess": ([t]) => t.value},
    {"name": "target_type", "symbols": [uint], "postprocess": ([t]) => t.value},
    {"name": "args$ebnf$1", "symbols": []},
    {"name": "args$ebnf$1", "symbols": ["args$ebnf$1", "arg"], "postprocess": function arrpush(d) {return d[0].concat([d[1]]);}},
    {"name": "args", "symbols": ["args$ebnf$1"], "postprocess": ([list]) => list},
    {"name": "arg", "symbols": [word], "postprocess": ([t]) => t.value},
    {"name": "arg", "symbols": [uint], "postprocess": ([t]) => t.value}
]
  , ParserStart: "entry"
}
if (typeof module !== 'undefined'&& typeof module.exports !== 'undefined') {
   module.exports = grammar;
} else {
   window.grammar = grammar;
}
})();
