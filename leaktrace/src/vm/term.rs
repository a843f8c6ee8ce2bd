//! Reading Erlang terms from the node's replies. Every reply is untrusted input: accessors
//! return `None` on any unexpected shape and never panic.

use erl_dist::term::{Atom, ExternalFun, FixInteger, List, Term, Tuple};

/// Integer value of a term (fixnum or bignum within i64).
pub fn int(t: &Term) -> Option<i64> {
    match t {
        Term::FixInteger(i) => Some(i64::from(i.value)),
        Term::BigInteger(b) => b.value.to_string().parse().ok(),
        _ => None,
    }
}

/// Non-negative integer value.
pub fn uint(t: &Term) -> Option<u64> {
    int(t).and_then(|v| u64::try_from(v).ok())
}

/// Atom name.
pub fn atom(t: &Term) -> Option<&str> {
    match t {
        Term::Atom(a) => Some(&a.name),
        _ => None,
    }
}

/// Elements of a proper list (a list of small integers is a byte list: not a list of terms).
pub fn list(t: &Term) -> Option<&[Term]> {
    match t {
        Term::List(l) => Some(&l.elements),
        _ => None,
    }
}

/// Elements of a tuple.
pub fn tuple(t: &Term) -> Option<&[Term]> {
    match t {
        Term::Tuple(t) => Some(&t.elements),
        _ => None,
    }
}

/// The tuple in a proplist whose first element is atom `key`.
pub fn prop<'a>(items: &'a [Term], key: &str) -> Option<&'a [Term]> {
    items.iter().find_map(|i| {
        let t = tuple(i)?;
        (atom(t.first()?)? == key).then_some(t)
    })
}

/// `{Key, Value}` value in a proplist.
pub fn prop_value<'a>(items: &'a [Term], key: &str) -> Option<&'a Term> {
    prop(items, key).and_then(|t| t.get(1))
}

/// Value of atom key `key` in a map.
pub fn map_value<'a>(t: &'a Term, key: &str) -> Option<&'a Term> {
    match t {
        Term::Map(m) => m.map.get(&Term::from(Atom::from(key))),
        _ => None,
    }
}

/// `{M, F, A}` as `m:f/a`, when the term is one.
pub fn mfa(t: &Term) -> Option<String> {
    let e = tuple(t)?;
    match e {
        [m, f, a] => Some(format!("{}:{}/{}", atom(m)?, atom(f)?, int(a)?)),
        _ => None,
    }
}

/// Printable form of a pid, port, atom, `{m,f,a}` or other term. Names come from the node and
/// may hold anything: callers escape them before printing to a terminal.
pub fn display(t: &Term) -> String {
    match t {
        Term::Pid(p) => format!("<0.{}.{}>", p.id, p.serial),
        Term::Port(p) => format!("#Port<0.{}>", p.id),
        Term::Atom(a) => a.name.clone(),
        other => mfa(other).unwrap_or_else(|| format!("{other}")),
    }
}

/// An external fun `fun M:F/A` (a call on the node that loads no code).
pub fn fun(module: &str, function: &str, arity: u8) -> Term {
    Term::from(ExternalFun {
        module: Atom::from(module),
        function: Atom::from(function),
        arity,
    })
}

/// An atom term.
pub fn atom_term(name: &str) -> Term {
    Term::from(Atom::from(name))
}

/// A list of atoms.
pub fn atoms(names: &[&str]) -> Term {
    Term::from(List::from(
        names.iter().map(|n| atom_term(n)).collect::<Vec<_>>(),
    ))
}

/// A tuple term.
pub fn tuple_term(items: Vec<Term>) -> Term {
    Term::from(Tuple::from(items))
}

/// A list term.
pub fn list_term(items: Vec<Term>) -> Term {
    Term::from(List::from(items))
}

/// A small integer term.
pub fn small(v: i32) -> Term {
    Term::from(FixInteger::from(v))
}
